r"""
Audit throughput against plain `StableDiffusionPipeline` sampling of the same images (issue: within 10%).

    python benchmarks/audit_throughput.py [--prompts 4] [--images 32] [--batch-size 16] [--steps 20] [--threads 1]

On the shipped miniature world: the plain baseline calls a stock diffusers `StableDiffusionPipeline` (built from the
miniature components) with the audit's per-image generators, `output_type="pt"`, and keeps the images; the audit is
`diffusers-fair audit` in-process with the eval classifier and the miniature CLIP (CLIP-T), writing PNGs, records and
the full report. Timings: "loop" = generation + classification + CLIP + PNGs + records (the audit's per-image work,
measured from its first generation call to its last record), "total" = the whole `run_audit` call including model
loading, plots, grids and html. Plain and audit runs alternate for `--rounds` rounds and the fastest of each
counts (the least disturbed by other processes on a shared machine). A last "paired" audit samples each prompt with
the plain pipeline right after generating it (timed apart), the comparison least affected by changing load.
"audit_own_work_fraction" is the loop's time outside generation (classifier, CLIP, PNGs, records) over the time
inside it, measured within one run, so it does not depend on the noise between separate runs on a shared machine.
"""

import argparse
import json
import tempfile
import time

import torch
from diffusers import StableDiffusionPipeline

from diffusers_fair.audit import core, parse_args, run_audit
from diffusers_fair.metrics import image_seed
from diffusers_fair.miniature import DEFAULT_GUIDANCE_SCALE, load_pipeline
from diffusers_fair.prompts import load_prompts


def plain_sampling(pipeline, prompts, images, batch_size, steps, seed=0) -> float:
    start = time.perf_counter()
    kept = []
    for prompt in prompts:
        for first in range(0, images, batch_size):
            count = min(batch_size, images - first)
            generators = [
                torch.Generator().manual_seed(image_seed(seed, prompt, j)) for j in range(first, first + count)
            ]
            output = pipeline(
                prompt,
                num_images_per_prompt=count,
                num_inference_steps=steps,
                guidance_scale=DEFAULT_GUIDANCE_SCALE,
                generator=generators,
                output_type="pt",
            )
            kept.append(output.images)
    return time.perf_counter() - start


def audit_once(args, paired_plain=None) -> tuple[float, float, float, float]:
    r"""
    One audit in a fresh folder: (loop seconds, total seconds, seconds inside generation, paired plain seconds).

    With `paired_plain` (a plain pipeline), each prompt is also sampled by it right after the audit generated it
    (timed apart and left out of the audit's times), so both see the same machine load.
    """
    first_call, inside_generation, last_record, paired = [], [], [], []
    real_generate = core.generate_images

    def timed_generate(pipeline, prompts, *a, **k):
        start = time.perf_counter()
        first_call.append(start)
        images = real_generate(pipeline, prompts, *a, **k)
        inside_generation.append(time.perf_counter() - start)
        if paired_plain is not None:
            paired.append(plain_sampling(paired_plain, prompts, args.images, args.batch_size, args.steps))
        return images

    core.generate_images = timed_generate
    with tempfile.TemporaryDirectory() as folder:
        audit_args = parse_args(
            ["--model", "miniature", "--prompts", "miniature-heldout", "--max-prompts", str(args.prompts),
             "--classifier", "miniature-eval", "--clip", "miniature", "--num-images-per-prompt", str(args.images),
             "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--no-progress", "--device", "cpu",
             "--output", f"{folder}/audit"]
        )  # fmt: skip
        start = time.perf_counter()
        try:
            run_audit(audit_args, on_prompt_done=lambda *_: last_record.append(time.perf_counter()))
        finally:
            core.generate_images = real_generate
        total = time.perf_counter() - start
    loop = last_record[-1] - first_call[0] - sum(paired)
    return loop, total - sum(paired), sum(inside_generation), sum(paired)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating plain/audit rounds; the fastest counts.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = load_prompts("miniature-heldout", limit=args.prompts)
    plain = StableDiffusionPipeline(**load_pipeline().components)
    plain.set_progress_bar_config(disable=True)
    plain_sampling(plain, prompts[:1], args.batch_size, args.batch_size, args.steps)  # warm-up

    plain_times, loops, totals, generation, own_work = [], [], [], [], []
    for _ in range(args.rounds):
        plain_times.append(plain_sampling(plain, prompts, args.images, args.batch_size, args.steps))
        loop, total, inside, _ = audit_once(args)
        loops.append(loop)
        totals.append(total)
        generation.append(inside)
        own_work.append((loop - inside) / inside)
    baseline, loop, total = min(plain_times), min(loops), min(totals)
    paired_loop, _, paired_generation, paired_plain = audit_once(args, paired_plain=plain)
    n = args.prompts * args.images
    result = {
        "images": n,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "plain_s": [round(t, 2) for t in plain_times],
        "audit_loop_s": [round(t, 2) for t in loops],
        "audit_total_s": [round(t, 2) for t in totals],
        "plain_images_per_s": round(n / baseline, 2),
        "audit_loop_images_per_s": round(n / loop, 2),
        "audit_generation_s": [round(t, 2) for t in generation],
        "audit_own_work_fraction": [round(f, 4) for f in own_work],
        "ratio_audit_loop_over_plain": round(loop / baseline, 3),
        "ratio_audit_total_over_plain": round(total / baseline, 3),
        "paired_plain_s": round(paired_plain, 2),
        "paired_audit_loop_s": round(paired_loop, 2),
        "paired_audit_generation_s": round(paired_generation, 2),
        "paired_ratio_audit_loop_over_plain": round(paired_loop / paired_plain, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
