r"""
Trains every artefact of the miniature world from scratch, seeded and on CPU.

    python -m diffusers_fair.miniature.train --output_dir DIR [--quick]

Stages, each written atomically to its own folder of `DIR` when it finishes (a rerun with the same `DIR` skips the
finished ones, so a crash loses at most the stage in progress):

1. `DIR/clip`: a tiny `CLIPModel` + `CLIPProcessor` trained contrastively on the world's images and captions, and
   `DIR/.stages/vae`: the `AutoencoderKL` (32x32x3 <-> 8x8x4), its `scaling_factor` measured on the data.
2. `DIR/classifier-train`, `DIR/classifier-eval`: independent attribute classifiers (other seed, architecture and
   augmentation), trained on clean renders and their VAE round-trips (the train one also on people with in-between
   hair and graded `hair` labels, `--hair_growth_fraction`, and on adversarial copies of its batches,
   `--classifier_adversarial_epsilon`); `DIR/classifier-context`: the occupation
   classifier that measures whether the context is preserved; and `DIR/pipeline`: the U-Net trained on the VAE
   latents (DDPM, epsilon prediction, Min-SNR weights, a fresh caption each time an image is drawn, 10% empty
   captions for classifier-free guidance, EMA) under CLIP's text tower as the frozen text encoder, as Stable
   Diffusion's U-Net is trained under a frozen CLIP, saved as a diffusers `StableDiffusionPipeline` folder with a
   `DPMSolverMultistepScheduler` (DPM-Solver++).

With `--num_threads 2` or more, the first of each pair trains in a second process on one thread while the other
trains here: the U-Net stage gains little from a second thread.

The shipped weights in `diffusers_fair/miniature/weights` were made with the default budget and arguments but one
thread (`--output_dir /tmp/mini-v5a --num_threads 1`, then copied there); see the miniature README for the times and
measurements.
"""

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
    CLIPTokenizer,
)

from ..semantics import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from ..utils import atomic_write_folder, atomic_write_json
from .models import MiniatureClassifier, make_clip, make_dino, make_unet, make_vae
from .tokenizer import build_tokenizer
from .world import (
    ATTRIBUTE_WORDS,
    ATTRIBUTES,
    OCCUPATION_NAMES,
    OCCUPATIONS,
    TEMPLATES,
    MiniatureDataset,
    attribute_caption,
    hair_growth,
    sample_dataset,
)

COMPANIONS = ["classifier-train", "classifier-eval", "classifier-context", "clip", "dino"]
# name: (full budget, --quick budget)
BUDGETS = {
    "images_per_occupation": (120, 4),
    "vae_steps": (1500, 10),
    "unet_steps": (5000, 5),
    "classifier_steps": (600, 5),
    "clip_steps": (600, 5),
    "dino_steps": (600, 5),
}
# The train classifier also sees in-between hair (`hair_growth`), labelled `long` with probability
# sigmoid((k - HAIR_MIDPOINT) / HAIR_SCALE) for `k` of the 15 rows grown. The midpoint is about where classifiers
# trained on the renders alone read `long` (rows 12-13: `benchmarks/hair_boundary.py`), so the alignment loss is not
# credited for less hair than the eval classifier counts. The grading gives a short-haired image a gradient towards
# growing hair, which such classifiers hardly do, and the demo's adaptors then lengthen hair more
# (model_cards/README.md, "Why lengthening stalls"). `--hair_growth_fraction` sets how many such people it sees.
HAIR_MIDPOINT = 11.5
HAIR_SCALE = 1.5
# The train classifier also learns from adversarial copies of its batches (L2 projected gradient ascent,
# `--classifier_adversarial_epsilon`), taking this many ascent steps per batch.
ADVERSARIAL_STEPS = 3


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the miniature world's pipeline, classifiers and CLIP.")
    parser.add_argument("--output_dir", "--output", required=True, help="Folder to write the artefacts to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data and of every stage.")
    parser.add_argument(
        "--quick", action="store_true", help="A tiny budget for smoke tests (seconds, useless models)."
    )
    for name, (full, _) in BUDGETS.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"Defaults to {full} (smaller with --quick).")
    parser.add_argument("--train_batch_size", type=int, default=32, help="Batch size of the U-Net stage.")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="Peak AdamW learning rate of the U-Net.")
    parser.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear warmup, then cosine to 10%%.")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the U-Net.")
    parser.add_argument(
        "--text_embedding_noise",
        type=float,
        default=0.1,
        help="Std of Gaussian noise added to text embeddings while training, so the U-Net tolerates moved ones.",
    )
    parser.add_argument(
        "--attribute_word_probability",
        type=float,
        default=0.15,
        help="Fraction of training captions that name one true attribute of the person ('a long-haired nurse').",
    )
    parser.add_argument(
        "--clip_caption_attribute_weight",
        type=float,
        default=1.0,
        help="Weight of CLIP's second text loss: a linear head on the pooled text output predicts the attributes "
        "of the caption's image from the caption alone (the head is not shipped); 0 turns it off.",
    )
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=5.0,
        help="Min-SNR-gamma loss weighting (Hang et al., 2023; 5.0 is the usual value): each timestep's loss is "
        "weighted by min(SNR, gamma) / SNR, so that low-noise timesteps do not dominate; 0 turns it off.",
    )
    parser.add_argument(
        "--hair_growth_fraction",
        type=float,
        default=0.5,
        help="The train classifier also learns in-between hair: this many extra people per render (0.5, the "
        "default: half as many again), their hair grown part of the way, with graded `hair` labels "
        "(`hair_growth_dataset`). 0: renders only, as the eval classifier.",
    )
    parser.add_argument(
        "--classifier_adversarial_epsilon",
        type=float,
        default=1.0,
        help="The train classifier learns from adversarial copies of its images: each batch is moved within this L2 "
        "radius (pixels in [0, 1]; a 32x32 image has norm of about 30) to raise its loss "
        f"(`adversarial_images`, {ADVERSARIAL_STEPS} steps). A classifier trained so has input gradients that point "
        "at the attribute's pixels rather than spread over the image, and the alignment loss moves pixels along "
        "them. 0: off, as the eval classifier.",
    )
    parser.add_argument(
        "--init_pipeline",
        default=None,
        help="Continue training the U-Net of a pipeline folder written by this script (its VAE and frozen text "
        "encoder are reused, not retrained) instead of starting from scratch.",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=2,
        help="torch CPU threads. With 2 or more, CLIP and then the classifiers train in a second process (one "
        "thread) while the VAE and then the U-Net train on the others.",
    )
    args = parser.parse_args(input_args)
    args.command = "python -m diffusers_fair.miniature.train " + " ".join(
        sys.argv[1:] if input_args is None else input_args
    )
    if not 0 <= args.attribute_word_probability <= 1:
        raise ValueError(f"`--attribute_word_probability` must be in [0, 1], got {args.attribute_word_probability}.")
    if args.clip_caption_attribute_weight < 0:
        raise ValueError(
            f"`--clip_caption_attribute_weight` must be >= 0 (0: off), got {args.clip_caption_attribute_weight}."
        )
    if args.snr_gamma < 0:
        raise ValueError(f"`--snr_gamma` must be >= 0 (0: no weighting), got {args.snr_gamma}.")
    if args.hair_growth_fraction < 0:
        raise ValueError(f"`--hair_growth_fraction` must be >= 0 (0: renders only), got {args.hair_growth_fraction}.")
    if not args.classifier_adversarial_epsilon >= 0:
        raise ValueError(
            f"`--classifier_adversarial_epsilon` must be >= 0 (0: off), got {args.classifier_adversarial_epsilon}."
        )
    if args.init_pipeline is not None and not os.path.isfile(os.path.join(args.init_pipeline, "model_index.json")):
        raise ValueError(f"`--init_pipeline` {args.init_pipeline!r} is not a pipeline folder (no model_index.json).")
    for name, (full, quick) in BUDGETS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    return args


def _write_card(folder: str, title: str, body: str, args: argparse.Namespace, metrics: dict) -> None:
    lines = [f"# {title}", "", body.strip(), "", "## How it was made", "", f"`{args.command}` (seed {args.seed}).", ""]
    lines += ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()] + [""]
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _save_with_processor(out_dir: str, model, processor, title: str, body: str, args, metrics: dict) -> None:
    """Saves a transformers model, its processor and its model card into `out_dir`, atomically."""

    def write(folder: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        _write_card(folder, title, body, args, metrics)

    atomic_write_folder(out_dir, write)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def _batches(generator: torch.Generator, n: int, batch_size: int):
    while True:
        for index in torch.randperm(n, generator=generator).split(batch_size):
            if len(index) == batch_size or n < batch_size:
                yield index


@torch.no_grad()
def _vae_round_trip(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    out = []
    for chunk in images.split(batch_size):
        latents = vae.encode(chunk * 2 - 1).latent_dist.mode()
        out.append((vae.decode(latents).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


# Every caption the U-Net stage can draw: occupation x template x (no word, or one attribute word).
CAPTION_SLOTS: list[tuple[str, str] | None] = [None] + [(a, c) for a in ATTRIBUTES for c in ATTRIBUTES[a]]
CAPTIONS: list[str] = [
    attribute_caption(occupation, template, None if slot is None else ATTRIBUTE_WORDS[slot[0]][slot[1]])
    for occupation in OCCUPATION_NAMES
    for template in range(len(TEMPLATES))
    for slot in CAPTION_SLOTS
]


def draw_captions(
    data, index: torch.Tensor, attribute_word_probability: float, generator: torch.Generator
) -> torch.Tensor:
    r"""
    A fresh caption for each drawn image, as indices into `CAPTIONS`: a uniform template and, with probability
    `attribute_word_probability`, the word of one true attribute (chosen uniformly) of the person.

    Drawing captions anew each time an image is drawn (rather than fixing one caption per image) shows every attribute
    word with every image of its class over training, so words steer the model even for rare attribute-occupation
    combinations ("a long-haired guard").

    Args:
        data ([`~diffusers_fair.miniature.world.MiniatureDataset`]): The training set (its labels and occupations).
        index (`torch.LongTensor` of shape `(B,)`): The drawn images' rows in `data`.
        attribute_word_probability (`float` in `[0, 1]`): Fraction of captions naming an attribute.
        generator (`torch.Generator`): CPU generator of the draws (templates, then word or not, then which attribute).

    Returns:
        `torch.LongTensor` of shape `(B,)`: indices into `CAPTIONS`.
    """
    templates = torch.randint(len(TEMPLATES), (len(index),), generator=generator)
    named = torch.rand(len(index), generator=generator) < attribute_word_probability
    attribute = torch.randint(len(ATTRIBUTES), (len(index),), generator=generator)
    slot = torch.zeros(len(index), dtype=torch.long)
    offset = 1
    for k, name in enumerate(ATTRIBUTES):
        chosen = named & (attribute == k)
        slot[chosen] = offset + data.labels[name][index][chosen]
        offset += len(ATTRIBUTES[name])
    return (data.occupations[index] * len(TEMPLATES) + templates) * len(CAPTION_SLOTS) + slot


def _token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids `(len(texts), model_max_length)`, padded as Stable Diffusion pipelines pad prompts."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    r"""
    Min-SNR-gamma weights `(B,)` of an epsilon-prediction loss (Hang et al., 2023): `min(SNR(t), gamma) / SNR(t)`,
    with diffusers' `compute_snr`; 1 at noisy timesteps (SNR <= gamma), less at clean ones.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    return snr.clamp(max=gamma) / snr


def train_vae(args, data, stage_dir: str) -> dict:
    torch.manual_seed(args.seed + 1)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(50, args.vae_steps))
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = _batches(generator, len(data.images), 32)
    progress = tqdm(range(args.vae_steps), desc="vae")
    for _ in progress:
        x = data.images[next(batches)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(c * 2 - 1).latent_dist.mode() for c in data.images[:1024].split(256)])
        mse = F.mse_loss(_vae_round_trip(vae, data.images[:1024]), data.images[:1024]).item()
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    atomic_write_folder(stage_dir, lambda d: vae.save_pretrained(d))
    return {"vae_psnr_db": round(10 * math.log10(1.0 / mse), 2), "scaling_factor": round(scaling_factor, 4)}


def train_pipeline(
    args,
    data,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    out_dir: str,
    vae_metrics: dict,
) -> dict:
    """Trains the U-Net on `text_encoder`'s outputs; the text encoder stays frozen, as Stable Diffusion's CLIP does."""
    torch.manual_seed(args.seed + 2)
    text_encoder.requires_grad_(False).eval()
    with torch.no_grad():
        posteriors = [vae.encode(c * 2 - 1).latent_dist for c in data.images.split(256)]
        means = torch.cat([p.mean for p in posteriors])
        stds = torch.cat([p.std for p in posteriors])
        ids = _token_ids(tokenizer, CAPTIONS)
        text_embeddings = torch.cat([text_encoder(chunk).last_hidden_state for chunk in ids.split(256)])
        empty_embedding = text_encoder(_token_ids(tokenizer, [""])).last_hidden_state
    if args.init_pipeline is None:
        unet = make_unet()
    else:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.init_pipeline, "unet"))
        unet.train()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(min(args.lr_warmup_steps, args.unet_steps), args.unet_steps)
    )
    generator = torch.Generator().manual_seed(args.seed + 2)
    batches = _batches(generator, len(means), args.train_batch_size)
    progress = tqdm(range(args.unet_steps), desc="unet")
    losses = []
    for step in progress:
        index = next(batches)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        latents = latents * vae.config.scaling_factor
        embeddings = text_embeddings[draw_captions(data, index, args.attribute_word_probability, generator)].clone()
        drop = torch.rand(len(index), generator=generator) < 0.1  # empty captions for classifier-free guidance
        embeddings[drop] = empty_embedding
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        embeddings = embeddings + args.text_embedding_noise * torch.randn(embeddings.shape, generator=generator)
        mse = F.mse_loss(unet(noisy, timesteps, embeddings).sample, noise, reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weights(noise_scheduler, timesteps, args.snr_gamma) if args.snr_gamma > 0 else 1.0
        loss = (mse * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, p in zip(ema, params):
                shadow.lerp_(p.detach(), 1 - decay)
        losses.append(mse.mean().item())
        progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    with torch.no_grad():
        for shadow, p in zip(ema, params):
            p.copy_(shadow)
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++")
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    metrics = {**vae_metrics, "unet_final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 4)}
    metrics.update(
        unet_parameters=sum(p.numel() for p in unet.parameters()),
        text_encoder_parameters=sum(p.numel() for p in text_encoder.parameters()),
        vae_parameters=sum(p.numel() for p in vae.parameters()),
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        train_batch_size=args.train_batch_size,
        training_images=len(means),
    )
    body = """
A miniature text-to-image model in the exact Stable Diffusion architecture (`AutoencoderKL` 32x32x3 <-> 8x8x4,
`UNet2DConditionModel` with 64-wide cross-attention, a 2-layer 64-wide `CLIPTextModel`, a `CLIPTokenizer` over the
world's own byte-level BPE vocabulary, `DPMSolverMultistepScheduler` with DPM-Solver++). The text encoder is the
text tower of the miniature CLIP, frozen while the U-Net trained, as Stable Diffusion's is OpenAI CLIP's. The VAE
and U-Net were trained from scratch on procedurally rendered pixel-art people of `diffusers_fair.miniature` whose
attribute distributions depend on the occupation (see `diffusers_fair/miniature/README.md`). It reproduces those
biases on purpose: it is the model the library's fairness finetuning is demonstrated and tested on. Generate at
32x32, 20 steps, guidance 3.
"""

    if args.init_pipeline is not None:
        metrics["init_pipeline"] = args.init_pipeline
        with open(os.path.join(args.init_pipeline, "README.md"), encoding="utf-8") as f:
            previous = f.read().split("## How it was made", 1)[-1].strip()
        body += f"\nContinued from `{args.init_pipeline}`, which was made as follows:\n\n{previous}\n"

    def write(folder: str) -> None:
        pipeline.save_pretrained(folder, safe_serialization=True)
        _write_card(folder, "Miniature Stable Diffusion (diffusers-fair)", body, args, metrics)

    atomic_write_folder(out_dir, write)
    return metrics


def _augment(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    if strength <= 0:
        return images
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(images), 1, 1, 1, generator=generator) * strength
    images = images * (1 - mix) + blur * mix
    noise = torch.randn(images.shape, generator=generator) * 0.05 * strength
    return (images + noise).clamp(0, 1)


def _classifier_loss(model, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(images)
    return sum(F.cross_entropy(logits[name], labels[name]) for name in labels)


def adversarial_images(
    model: MiniatureClassifier,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    epsilon: float,
    steps: int = ADVERSARIAL_STEPS,
) -> torch.Tensor:
    r"""
    Adversarial copies of `images` for training `model` (projected gradient ascent in L2, Madry et al., 2018): each
    image moves `steps` times along its normalised loss gradient, by `2.5 * epsilon / steps`, and back onto the ball
    of radius `epsilon` around it; the result is clamped to `[0, 1]`.

    Args:
        model ([`MiniatureClassifier`]): the classifier being trained; its parameters get no gradient here.
        images (`torch.Tensor` of shape `(B, 3, 32, 32)`): values in `[0, 1]`.
        labels (`dict[str, torch.Tensor]`): attribute -> class indices `(B,)` or class probabilities `(B, K)`; the
            loss raised is the sum of their cross-entropies.
        epsilon (`float`): L2 radius per image, > 0.
        steps (`int`, *optional*, defaults to `ADVERSARIAL_STEPS`): ascent steps, >= 1.

    Returns:
        `torch.Tensor` of shape `(B, 3, 32, 32)`, detached, in `[0, 1]`, each within `epsilon` (L2) of its image.

    Raises:
        `ValueError`: `epsilon` is not > 0 or `steps` is below 1.
    """
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon}; skip the adversarial copies instead.")
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")

    def per_image_norm(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]

    images = images.detach()
    delta = torch.zeros_like(images)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = _classifier_loss(model, (images + delta).clamp(0, 1), labels)
        (gradient,) = torch.autograd.grad(loss, delta)
        delta = delta.detach() + 2.5 * epsilon / steps * gradient / per_image_norm(gradient)
        delta = delta * (epsilon / per_image_norm(delta)).clamp(max=1.0)
    return (images + delta).clamp(0, 1)


def train_classifier(
    args,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    classes: dict[str, list[str]],
    architecture: dict,
    seed: int,
    augmentation: float,
    adversarial_epsilon: float = 0.0,
) -> MiniatureClassifier:
    torch.manual_seed(seed)
    model = MiniatureClassifier(classes, **architecture)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(20, args.classifier_steps))
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(generator, len(images), 64)
    progress = tqdm(range(args.classifier_steps), desc=f"classifier {sorted(classes)} seed {seed}")
    for _ in progress:
        index = next(batches)
        batch = _augment(images[index], generator, augmentation)
        batch_labels = {name: labels[name][index] for name in classes}
        if adversarial_epsilon > 0:
            batch = adversarial_images(model, batch, batch_labels, adversarial_epsilon)
        loss = _classifier_loss(model, batch, batch_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy of `model` on `images` `(N, 3, 32, 32)` in `[0, 1]` with class-index `labels`."""
    logits = {name: torch.cat(parts) for name, parts in _chunked_logits(model, images).items()}
    return {name: float((logits[name].argmax(1) == labels[name]).float().mean()) for name in logits}


def _chunked_logits(model, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for chunk in images.split(256):
        for name, value in model(chunk).items():
            out.setdefault(name, []).append(value)
    return out


def train_clip(args, data, tokenizer: CLIPTokenizer, out_dir: str) -> dict:
    torch.manual_seed(args.seed + 6)
    rng = np.random.default_rng(args.seed + 6)
    # CLIP's captions name a true attribute half of the time, so its features see attributes as well as context.
    captions = []
    for i in range(len(data.images)):
        occupation = OCCUPATION_NAMES[int(data.occupations[i])]
        word = None
        if rng.random() < 0.5:
            attribute = list(ATTRIBUTES)[rng.integers(len(ATTRIBUTES))]
            word = ATTRIBUTE_WORDS[attribute][ATTRIBUTES[attribute][int(data.labels[attribute][i])]]
        captions.append(attribute_caption(occupation, int(rng.integers(len(TEMPLATES))), word))
    ids = _token_ids(tokenizer, captions)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    model = make_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    # Real text encoders learn which attributes words go with from web-scale text, so an occupation's gender
    # association lies along the same linear direction as the word "woman". A few hundred contrastive steps on this
    # world do not teach that. The head below does: it predicts the image's attributes from the caption alone. For
    # "a nurse" the best answer is the nurse's frequencies; for "a long-haired nurse", "long". So both the word and
    # the occupation's prior move the pooled text state along one shared direction per attribute.
    splits = [len(c) for c in ATTRIBUTES.values()]
    head = torch.nn.Linear(model.config.text_config.hidden_size, sum(splits))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(50, args.clip_steps))
    generator = torch.Generator().manual_seed(args.seed + 6)
    batches = _batches(generator, len(ids), 128)
    progress = tqdm(range(args.clip_steps), desc="clip")
    for _ in progress:
        index = next(batches)
        pixel_values = (_augment(data.images[index], generator, 0.5) - mean) / std
        output = model(input_ids=ids[index], pixel_values=pixel_values, return_loss=True)
        attribute_logits = head(output.text_model_output.pooler_output).split(splits, dim=-1)
        attribute_loss = sum(
            F.cross_entropy(logits, data.labels[name][index]) for logits, name in zip(attribute_logits, ATTRIBUTES)
        )
        loss = output.loss + args.clip_caption_attribute_weight * attribute_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{output.loss.item():.4f}", attributes=f"{attribute_loss.item():.4f}")
    model.eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    metrics = {
        "clip_steps": args.clip_steps,
        "final_contrastive_loss": round(output.loss.item(), 4),
        "final_caption_attribute_loss": round(attribute_loss.item(), 4),
        "caption_attribute_weight": args.clip_caption_attribute_weight,
    }
    body = """
A tiny transformers `CLIPModel` (2-layer 64-wide text tower over the miniature vocabulary, 2-layer 64-wide ViT with
4x4 patches on 32x32 images, 64-d projections) trained contrastively on the miniature world's images and captions
(half of them naming a true attribute). A second loss (weight `clip_caption_attribute_weight`) trains a linear head,
not shipped, to predict the image's attributes from the pooled text output of its caption alone. It stands in for the
text statistics that put occupations' gender associations along a linear direction of real text encoders: here each
occupation's attribute frequencies become linearly readable from its prompt's pooled output, held-out occupations
included. Its text tower is the miniature pipeline's frozen text encoder. It lets CLIP-T / CLIP-I and the image
semantics loss run through the same code as real CLIP. Normalise images with CLIP's mean and std (the saved
`CLIPProcessor` does).
"""

    _save_with_processor(out_dir, model, processor, "Miniature CLIP (diffusers-fair)", body, args, metrics)
    return metrics


def hair_growth_dataset(num_images: int, seed: int) -> MiniatureDataset:
    r"""
    People with in-between hair for the train classifier: each a random occupation, skin tone and age, its hair grown
    [`hair_growth`] a random `k` of the 15 rows (1 to 14).

    Returns:
        [`MiniatureDataset`] whose `labels["hair"]` are `(N, 2)` probabilities of `short` / `long`,
        `sigmoid((k - HAIR_MIDPOINT) / HAIR_SCALE)` for `long`; `skin` and `age` are class indices; no captions.

    Raises:
        `ValueError`: `num_images` is below 1.
    """
    if num_images < 1:
        raise ValueError(f"`num_images` must be >= 1, got {num_images}; pass no growth data at all instead.")
    rng = np.random.default_rng(seed)
    images, hair, skin, age, occupations = [], [], [], [], []
    for _ in range(num_images):
        occupation, skin_index, age_index = (
            int(rng.integers(n)) for n in (len(OCCUPATIONS), len(ATTRIBUTES["skin"]), len(ATTRIBUTES["age"]))
        )
        path = hair_growth(OCCUPATIONS[occupation], ATTRIBUTES["skin"][skin_index], ATTRIBUTES["age"][age_index], rng)
        rows = int(rng.integers(1, len(path) - 1))
        images.append(path[rows])
        long = 1.0 / (1.0 + math.exp(-(rows - HAIR_MIDPOINT) / HAIR_SCALE))
        hair.append((1.0 - long, long))
        skin.append(skin_index)
        age.append(age_index)
        occupations.append(occupation)
    return MiniatureDataset(
        images=torch.stack(images),
        labels={
            "hair": torch.tensor(hair, dtype=torch.float32),
            "skin": torch.tensor(skin, dtype=torch.long),
            "age": torch.tensor(age, dtype=torch.long),
        },
        occupations=torch.tensor(occupations, dtype=torch.long),
        captions=[""] * num_images,
    )


class _ClassifierSpec(NamedTuple):
    """How `_classifiers_stage` trains one classifier; `data` builds its training images and labels when called."""

    classes: dict[str, list[str]]
    data: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    fresh_labels: dict[str, torch.Tensor]
    architecture: dict
    seed: int
    augmentation: float
    adversarial_epsilon: float = 0.0


def _classifiers_stage(args, data, vae_dir: str) -> tuple[dict, dict]:
    """Trains the classifiers not yet in `args.output_dir`; returns their metrics and timings."""
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    summary, timings = {}, {}
    # Classifiers on clean renders + VAE round-trips; accuracy measured on a fresh seed.
    fresh = sample_dataset(images_per_occupation=max(2, args.images_per_occupation // 6), seed=args.seed + 1000)
    fresh_round_trip = _vae_round_trip(vae, fresh.images)
    images = torch.cat([data.images, _vae_round_trip(vae, data.images)])
    labels = {name: value.repeat(2) for name, value in data.labels.items()}
    num_growth = round(args.hair_growth_fraction * len(data.images))

    def train_data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The train classifier's data: also people with in-between hair (graded `hair` labels), and round trips."""
        if num_growth == 0:
            return images, labels
        growth = hair_growth_dataset(num_growth, seed=args.seed + 6)
        train_images = torch.cat([data.images, growth.images])
        train_images = torch.cat([train_images, _vae_round_trip(vae, train_images)])
        train_labels = {name: torch.cat([data.labels[name], growth.labels[name]]) for name in ("skin", "age")}
        hair = F.one_hot(data.labels["hair"], len(ATTRIBUTES["hair"])).float()
        train_labels["hair"] = torch.cat([hair, growth.labels["hair"]])
        return train_images, {name: torch.cat([value, value]) for name, value in train_labels.items()}

    occupation = {"occupation": data.occupations.repeat(2)}
    fresh_occupation = {"occupation": fresh.occupations}
    specs = {
        "classifier-train": _ClassifierSpec(
            classes=ATTRIBUTES,
            data=train_data,
            fresh_labels=fresh.labels,
            architecture={"width": 32},
            seed=args.seed + 3,
            augmentation=0.0,
            adversarial_epsilon=args.classifier_adversarial_epsilon,
        ),
        "classifier-eval": _ClassifierSpec(
            classes=ATTRIBUTES,
            data=lambda: (images, labels),
            fresh_labels=fresh.labels,
            architecture={"width": 24, "kernel_size": 5, "activation": "gelu", "pooling": "avg"},
            seed=args.seed + 4,
            augmentation=1.0,
        ),
        "classifier-context": _ClassifierSpec(
            classes={"occupation": OCCUPATION_NAMES},
            data=lambda: (images, occupation),
            fresh_labels=fresh_occupation,
            architecture={"width": 32},
            seed=args.seed + 5,
            augmentation=0.5,
        ),
    }
    # Each classifier's data is built only if it is still to train (a resumed run skips the finished ones).
    for name, spec in specs.items():
        folder = os.path.join(args.output_dir, name)
        if os.path.isdir(folder):
            continue
        stage_images, stage_labels = spec.data()
        t = time.time()
        epsilon = spec.adversarial_epsilon
        model = train_classifier(
            args,
            stage_images,
            stage_labels,
            spec.classes,
            spec.architecture,
            spec.seed,
            spec.augmentation,
            adversarial_epsilon=epsilon,
        )
        metrics = {
            **{
                f"accuracy_fresh_{k}": round(v, 4)
                for k, v in classifier_accuracy(model, fresh.images, spec.fresh_labels).items()
            },
            **{
                f"accuracy_vae_round_trip_{k}": round(v, 4)
                for k, v in classifier_accuracy(model, fresh_round_trip, spec.fresh_labels).items()
            },
            "architecture": json.dumps(spec.architecture),
            "seed": spec.seed,
            "steps": args.classifier_steps,
            **({"adversarial_epsilon": epsilon} if epsilon > 0 else {}),
        }
        summary[name] = metrics
        role = {
            "classifier-train": "the classifier the distributional alignment loss trains against"
            + (
                f". Besides the renders it saw {num_growth} people with in-between hair "
                "(`diffusers_fair.miniature.hair_growth`), labelled `long` with probability "
                f"sigmoid((k - {HAIR_MIDPOINT}) / {HAIR_SCALE}) for k of the 15 rows grown"
                if num_growth > 0
                else ""
            )
            + (
                f". It also learned from adversarial copies of its images (L2 radius {epsilon}, {ADVERSARIAL_STEPS} "
                "steps of projected gradient ascent: `diffusers_fair.miniature.train.adversarial_images`), so that "
                "its input gradients point at the attributes' pixels"
                if epsilon > 0
                else ""
            ),
            "classifier-eval": "an independent classifier (other seed, architecture and augmentation) for evaluation",
            "classifier-context": "the occupation (context) classifier that measures semantics preservation",
        }[name]
        num_classes = json.dumps({k: len(v) for k, v in spec.classes.items()})
        body = f"""
A `diffusers_fair.miniature.MiniatureClassifier` (`diffusers_fair.AttributeClassifier`): {role}. Input
`(B, 3, 32, 32)` images in `[0, 1]`; output per-attribute logits over {num_classes}
classes. Trained on the miniature world's renders and their VAE round-trips. Load it with
`diffusers_fair.miniature.load_classifier(...)`. Accuracies below are on renders of a fresh seed.
"""

        def write(folder: str, model=model, body=body, metrics=metrics, title=f"Miniature {name} (diffusers-fair)"):
            model.save_pretrained(folder)
            _write_card(folder, title, body, args, metrics)

        atomic_write_folder(folder, write)
        timings[f"{name}_s"] = round(time.time() - t, 1)

    return summary, timings


def _random_crops(images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """DINO's global views: a random square crop of `min_scale`-1 of the side, resized back, flipped half the time."""
    batch = len(images)
    scale = min_scale + (1 - min_scale) * torch.rand(batch, generator=generator)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1 - scale).unsqueeze(1)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale * flip, scale, shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _nearest_neighbour_accuracy(bank: torch.Tensor, bank_labels, queries: torch.Tensor, query_labels) -> dict:
    """1-nearest-neighbour (cosine) accuracy of `queries` against `bank`, per label name."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T
    nearest = similarity.argmax(dim=1)
    return {
        name: round((bank_labels[name][nearest] == query_labels[name]).float().mean().item(), 4)
        for name in bank_labels
    }


def train_dino(args, data, out_dir: str) -> dict:
    r"""
    Trains the miniature `Dinov2Model` by DINO self-distillation (Caron et al., 2021; the objective DINOv2 builds on)
    on the training renders: a student sees one random crop, an EMA teacher another, and the student's prototype
    distribution matches the teacher's centred and sharpened one. No labels or captions are used.
    """
    torch.manual_seed(args.seed + 7)
    generator = torch.Generator().manual_seed(args.seed + 7)
    num_prototypes, student_temperature, teacher_temperature, center_momentum = 256, 0.1, 0.04, 0.9
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def make_head(width: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width),
            torch.nn.LayerNorm(width), torch.nn.Linear(width, num_prototypes),
        )  # fmt: skip

    student = make_dino()
    width = student.config.hidden_size
    student_head = make_head(width)
    fresh = sample_dataset(images_per_occupation=4, seed=args.seed + 1000)
    labels = {**data.labels, "occupation": data.occupations}
    fresh_labels = {**fresh.labels, "occupation": fresh.occupations}

    def accuracy(model) -> dict:
        model.eval()
        with torch.no_grad():
            bank, queries = (
                torch.cat([model(pixel_values=(c - mean) / std).pooler_output for c in images.split(512)])
                for images in (data.images, fresh.images)
            )
        model.train()
        return _nearest_neighbour_accuracy(bank, labels, queries, fresh_labels)

    untrained = accuracy(student)  # the baseline: what the architecture gives before any training
    teacher, teacher_head = make_dino(), make_head(width)
    teacher.load_state_dict(student.state_dict())
    teacher_head.load_state_dict(student_head.state_dict())
    teacher.requires_grad_(False)
    teacher_head.requires_grad_(False)
    parameters = [*student.parameters(), *student_head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.04)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(50, args.dino_steps))
    center = torch.zeros(num_prototypes)
    batches = _batches(generator, len(data.images), 128)
    progress = tqdm(range(args.dino_steps), desc="dino")
    for step in progress:
        images = data.images[next(batches)]
        views = [(_augment(_random_crops(images, generator), generator, 0.5) - mean) / std for _ in range(2)]
        student_logits = [student_head(student(pixel_values=v).pooler_output) / student_temperature for v in views]
        with torch.no_grad():
            teacher_logits = [teacher_head(teacher(pixel_values=v).pooler_output) for v in views]
            targets = [F.softmax((t - center) / teacher_temperature, dim=-1) for t in teacher_logits]
        # Each view's student output matches the other view's teacher output.
        loss = sum(
            -(targets[1 - i] * F.log_softmax(student_logits[i], dim=-1)).sum(-1).mean() for i in range(2)
        ) / 2  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 3.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            momentum = 1 - (1 - 0.99) * (math.cos(math.pi * step / args.dino_steps) + 1) / 2
            for teacher_module, student_module in ((teacher, student), (teacher_head, student_head)):
                for t, s in zip(teacher_module.parameters(), student_module.parameters()):
                    t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
            center = center * center_momentum + torch.cat(teacher_logits).mean(0) * (1 - center_momentum)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    # The teacher is the model DINO keeps.
    trained = accuracy(teacher)
    teacher.eval()
    metrics = {
        "dino_steps": args.dino_steps,
        "final_dino_loss": round(loss.item(), 4),
        **{f"nearest_neighbour_accuracy_{name}": value for name, value in trained.items()},
        **{f"nearest_neighbour_accuracy_{name}_untrained": value for name, value in untrained.items()},
    }
    image_processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 32},
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    body = """
A tiny transformers `Dinov2Model` (2 layers, width 64, 4 heads, MLP ratio 2, 4x4 patches on 32x32 images), the
miniature world's second image encoder: CLIP's image tower learnt what captions name, this one learnt what images
share under crops, flips, blur and noise. It was trained by DINO self-distillation on the training renders (no labels
or captions): a student and its EMA teacher see two random crops of an image, and the student's distribution over
256 prototypes matches the teacher's centred and sharpened one; the teacher is saved. Its `pooler_output` (the
layer-normed CLS token) is the image feature of DINO similarity and of the image semantics loss. Give it 32x32
images normalised with ImageNet's mean and std (the saved image processor does; `load_dino()` wraps it in a
`diffusers_fair.semantics.ImageFeatureExtractor` that does so differentiably). Accuracies below: each fresh render's
nearest training render by cosine of features has the same label; `_untrained` is the same network before training
(its random initialisation), the baseline training must beat.
"""

    _save_with_processor(out_dir, teacher, image_processor, "Miniature DINO (diffusers-fair)", body, args, metrics)
    return metrics


def _dino_stage(args, data) -> tuple[dict, dict]:
    """Trains the Dinov2-architecture encoder unless it is in `args.output_dir`; returns its metrics and timing."""
    dino_dir = os.path.join(args.output_dir, "dino")
    if os.path.isdir(dino_dir):
        return {}, {}
    t = time.time()
    metrics = train_dino(args, data, dino_dir)
    return {"dino": metrics}, {"dino_s": round(time.time() - t, 1)}


def _clip_stage(args, data, tokenizer_dir: str) -> tuple[dict, dict]:
    """Trains CLIP unless it is in `args.output_dir`; returns its metrics and timing."""
    clip_dir = os.path.join(args.output_dir, "clip")
    if os.path.isdir(clip_dir):
        return {}, {}
    t = time.time()
    metrics = train_clip(args, data, CLIPTokenizer.from_pretrained(tokenizer_dir), clip_dir)
    return {"clip": metrics}, {"clip_s": round(time.time() - t, 1)}


def _on_one_thread(stage: Callable, *stage_args):
    torch.set_num_threads(1)
    return stage(*stage_args)


def _start(executor: ProcessPoolExecutor | None, stage: Callable, *stage_args) -> Callable[[], tuple[dict, dict]]:
    """Runs `stage` in `executor`'s process on one thread, or here and now without one; returns its result getter."""
    if executor is None:
        result = stage(*stage_args)
        return lambda: result
    return executor.submit(_on_one_thread, stage, *stage_args).result


def _merge(result: tuple[dict, dict], summary: dict, timings: dict) -> None:
    summary.update(result[0])
    timings.update(result[1])


def main(input_args: list[str] | None = None) -> dict:
    args = parse_args(input_args)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    timings, summary = {}, {}
    # The U-Net draws a fresh caption per image each time (`train_pipeline`); the dataset's own captions (whose
    # drawing would change the images with `--attribute_word_probability`) are not used.
    data = sample_dataset(images_per_occupation=args.images_per_occupation, seed=args.seed)
    tokenizer_dir = os.path.join(args.output_dir, ".stages", "tokenizer")
    tokenizer = build_tokenizer(tokenizer_dir)

    # Stages run in pairs: CLIP beside the VAE, then the classifiers (which need the VAE) beside the U-Net (which needs
    # CLIP's text tower as its text encoder). With two or more threads, the first of each pair trains in a second
    # process on one thread, as the U-Net stage gains little from a second thread; otherwise one after the other.
    pipeline_dir = os.path.join(args.output_dir, "pipeline")
    clip_dir = os.path.join(args.output_dir, "clip")
    vae_dir = os.path.join(args.output_dir, ".stages", "vae")
    metrics_path = os.path.join(args.output_dir, ".stages", "vae_metrics.json")
    if os.path.isdir(pipeline_dir):  # a finished pipeline holds the VAE it was trained with
        vae_dir = os.path.join(pipeline_dir, "vae")
    elif args.init_pipeline is not None:
        vae_dir = os.path.join(args.init_pipeline, "vae")
    companions_left = any(not os.path.isdir(os.path.join(args.output_dir, name)) for name in COMPANIONS)
    executor = None
    if args.num_threads >= 2 and companions_left and not os.path.isdir(pipeline_dir):
        executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        torch.set_num_threads(args.num_threads - 1)
    try:
        # 1. CLIP | VAE
        clip_stage = _start(executor, _clip_stage, args, data, tokenizer_dir)
        if not os.path.isdir(vae_dir):
            t = time.time()
            atomic_write_json(metrics_path, train_vae(args, data, vae_dir))
            timings["vae_s"] = round(time.time() - t, 1)
        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        vae_metrics = {}
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                vae_metrics = json.load(f)
        summary.update(vae_metrics)
        _merge(clip_stage(), summary, timings)
        # 2. classifiers, then DINO | text encoder (frozen CLIP text tower) + U-Net
        classifiers_stage = _start(executor, _classifiers_stage, args, data, vae_dir)
        dino_stage = _start(executor, _dino_stage, args, data)
        if not os.path.isdir(pipeline_dir):
            t = time.time()
            if args.init_pipeline is None:
                text_encoder = CLIPModel.from_pretrained(clip_dir).text_model
            else:
                text_encoder = CLIPTextModel.from_pretrained(os.path.join(args.init_pipeline, "text_encoder"))
            summary.update(train_pipeline(args, data, vae, tokenizer, text_encoder, pipeline_dir, vae_metrics))
            timings["text_encoder_unet_s"] = round(time.time() - t, 1)
        _merge(classifiers_stage(), summary, timings)
        _merge(dino_stage(), summary, timings)
    finally:
        if executor is not None:
            executor.shutdown()

    # Intermediate stages are only needed until the pipeline exists; they are not shipped.
    shutil.rmtree(os.path.join(args.output_dir, ".stages"), ignore_errors=True)
    timings["total_s"] = round(time.time() - start, 1)
    summary["timings"] = timings
    print(json.dumps(summary, indent=2))
    atomic_write_json(os.path.join(args.output_dir, "training_summary.json"), summary)
    return summary


if __name__ == "__main__":
    main()
