"""Run under `accelerate launch --multi_gpu --num_processes 2`: the training example on the miniature world, each
process recording the prompt and noise seed of its training engine calls, the prompts of its other calls (evaluation,
validation grid) and the learning rate of each step into `OUTPUT_DIR/process-{rank}.json`. Arguments: the output
folder, then the example's flags. With `HIDE_SAVED_EVALUATION=1`, processes other than the main one do not see the
output folder's `evaluation_before.json`, as on nodes that do not share that folder."""

import importlib.util
import json
import os
import sys

from accelerate import Accelerator

from diffusers_fair import FairStableDiffusionPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(output_dir: str, flags: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "train_fair_lora", os.path.join(ROOT, "examples", "train_fair_lora.py")
    )
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    calls, rates, evaluated = [], [], []

    call, log = FairStableDiffusionPipeline.__call__, Accelerator.log

    def recording_call(self, *args, **kwargs):
        if kwargs.get("return_original"):  # a training step's engine call
            calls.append({"prompt": kwargs["prompt"], "noise_seed": kwargs["generator"].initial_seed()})
        else:  # evaluation or validation grid
            evaluated.extend([kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"])
        return call(self, *args, **kwargs)

    def recording_log(self, values, step=None, **kwargs):
        if "lr" in values:
            rates.append(values["lr"])
        return log(self, values, step=step, **kwargs)

    FairStableDiffusionPipeline.__call__, Accelerator.log = recording_call, recording_log
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("HIDE_SAVED_EVALUATION") == "1" and rank != 0:
        isfile = os.path.isfile
        os.path.isfile = lambda path: not str(path).endswith("evaluation_before.json") and isfile(path)
        assert isfile(os.path.join(output_dir, "evaluation_before.json"))
        assert not os.path.isfile(os.path.join(output_dir, "evaluation_before.json"))
    train.main(["--output_dir", output_dir, *flags])
    with open(os.path.join(output_dir, f"process-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"calls": calls, "learning_rates": rates, "evaluated_prompts": sorted(set(evaluated))}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
