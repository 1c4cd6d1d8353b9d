"""Peak memory and time of one direct-finetuning iteration, per gradient method and number of sampling steps.

One iteration = sampling + VAE decode + a pixel loss + backward, training a text-encoder LoRA (rank 4).
Each (method, steps) runs in a fresh subprocess; peak memory is the iteration's high-water mark above the memory
held after building the models (CPU: resident set size; CUDA: `torch.cuda.max_memory_allocated`). The last printed
line is a JSON object with every figure and the ratios memory-flat / autograd-hooks at 20 steps.

    python benchmarks/gradient_memory.py                       # small models on the CPU (default)
    python benchmarks/gradient_memory.py --full-size --device cuda --dtype float16 --batch-size 24 --steps 20
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = {
    "naive": {"gradient": "naive"},
    "naive+checkpointing": {"gradient": "naive", "checkpointing": True},
    "biased-autograd-hooks": {"gradient": "biased", "biased_gradient_impl": "autograd"},
    "biased-memory-flat": {"gradient": "biased"},
    "biased-memory-flat-k5": {"gradient": "biased", "backprop_steps": 5},
    "no-grad-sampling": {"gradient": None},
}


def build_pipeline(full_size: bool, device: str, dtype):
    import torch
    from peft import LoraConfig

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny_models import tiny_components

    from diffusers_fair import FairStableDiffusionPipeline

    # Small enough for 2 CPU cores, large enough that activations dominate the allocator's noise.
    components = tiny_components(
        unet_channels=(32, 64),
        vae_channels=(16, 32),
        text_width=64,
        latent_size=32,
        norm_groups=8,
        attention_head_dim=8,
    )
    if full_size:  # the Stable Diffusion v1.5 architecture, random weights (compute does not depend on values)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = components["tokenizer"]
        torch.manual_seed(0)
        components["unet"] = UNet2DConditionModel(cross_attention_dim=768, sample_size=64, attention_head_dim=8)
        components["vae"] = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        components["text_encoder"] = CLIPTextModel(text_config)
        for name in ("unet", "vae", "text_encoder"):
            components[name].requires_grad_(False).eval()
    pipe = FairStableDiffusionPipeline(**components).to(device, dtype)
    pipe.text_encoder.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    )
    for p in pipe.text_encoder.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights in float32, as mixed-precision training keeps them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def worker(config: dict) -> dict:
    import torch

    torch.set_num_threads(config["threads"])
    device, dtype = config["device"], getattr(torch, config["dtype"])
    pipe = build_pipeline(config["full_size"], device, dtype)
    method = dict(METHODS[config["method"]])
    if method.pop("checkpointing", False):
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.gradient_checkpointing_enable()
    gradient = method.get("gradient")
    if gradient == "biased" and method.get("biased_gradient_impl", "recompute") == "recompute":
        method["recompute_chunk_size"] = config["recompute_chunk_size"]
    prompts = ["a photo of the face of a doctor, a person"] * config["batch_size"]

    def iteration():
        out = pipe(
            prompt=prompts,
            num_inference_steps=config["steps"],
            guidance_scale=7.5,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **method,
        )
        if gradient is not None:
            (out.images.float() - 0.5).pow(2).mean().backward()
        pipe.text_encoder.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    iteration()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    first = time.perf_counter() - start
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        iteration()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_mb": peak / 2**20, "time_s": min(times) if times else first}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SD v1.5 architecture at 512 px (random weights).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=None, help="Images per iteration (default 2 CPU, 24 full).")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="Sampling steps (default 10 20 40).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="Timed iterations after the first (min is kept).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recompute-chunk-size", type=int, default=2, help="Steps per U-Net call in the recompute.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    batch_size = args.batch_size or (24 if args.full_size else 2)
    steps_list = args.steps or ([20] if args.full_size else [10, 20, 40])
    results = {}
    print(f"{'method':<24}{'steps':>6}{'peak MB':>12}{'time s':>10}")
    for steps in steps_list:
        for method in args.methods:
            config = {
                "method": method,
                "steps": steps,
                "batch_size": batch_size,
                "device": args.device,
                "dtype": args.dtype,
                "full_size": args.full_size,
                "repeats": args.repeats,
                "threads": args.threads,
                "recompute_chunk_size": args.recompute_chunk_size,
            }
            run = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True
            )
            if run.returncode != 0:
                line = (run.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{method:<24}{steps:>6}   failed: {line}")
                results[f"{method}@{steps}"] = {"error": line}
                continue
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            results[f"{method}@{steps}"] = figures
            print(f"{method:<24}{steps:>6}{figures['peak_mb']:>12.1f}{figures['time_s']:>10.2f}")
    summary = {"device": args.device, "dtype": args.dtype, "full_size": args.full_size, "batch_size": batch_size}
    reference_steps = 20 if 20 in steps_list else steps_list[0]

    def figure(method, key):
        return results.get(f"{method}@{reference_steps}", {}).get(key)

    flat, hooks = "biased-memory-flat", "biased-autograd-hooks"
    if figure(flat, "peak_mb") and figure(hooks, "peak_mb"):
        summary["peak_memory_ratio"] = figure(flat, "peak_mb") / figure(hooks, "peak_mb")
        summary["time_ratio"] = figure(flat, "time_s") / figure(hooks, "time_s")
    sampling = figure("no-grad-sampling", "time_s")
    if sampling:
        for method in (flat, "biased-memory-flat-k5"):
            if figure(method, "time_s"):
                summary[f"{method}_time_over_sampling"] = figure(method, "time_s") / sampling
    summary["results"] = results
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
