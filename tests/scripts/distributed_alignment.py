"""Run under `accelerate launch --cpu --num_processes 2`: each process classifies its half of a fixed batch and
transports with `accelerator.gather`, as the training example does; rank 0 writes the targets and losses."""

import json
import sys

import torch
from accelerate import Accelerator

from diffusers_fair import DistributionalAlignmentLoss


def batch(n: int = 12):
    generator = torch.Generator().manual_seed(0)
    logits = {"hair": torch.randn(n, 2, generator=generator) * 2, "skin": torch.randn(n, 4, generator=generator)}
    mask = torch.ones(n, dtype=torch.bool)
    mask[4] = False
    return logits, mask


def main(output: str) -> None:
    accelerator = Accelerator(cpu=True)
    logits, mask = batch()
    n = mask.shape[0] // accelerator.num_processes
    rows = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
    attributes = {"hair": ["short", "long"], "skin": ["1", "2", "3", "4"]}
    loss_fn = DistributionalAlignmentLoss("hair=uniform;skin=uniform", 0.5, attributes, seed=0)
    local = {a: v[rows].clone().requires_grad_() for a, v in logits.items()}
    loss, diagnostics = loss_fn(local, mask[rows], gather=accelerator.gather, process_index=accelerator.process_index)
    losses = accelerator.gather(loss.detach()[None])
    if accelerator.is_main_process:
        result = {"targets": {a: t.tolist() for a, t in diagnostics.targets.items()}, "losses": losses.tolist()}
        with open(output, "w", encoding="utf-8") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()
    # Tear the process group down before exiting: a gloo group left to the interpreter's exit can abort a process
    # ("terminate called without an active exception", seen once in CI), as the training example's end_training does.
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
