r"""
Measures what the miniature world must show (numbers in `diffusers_fair/miniature/README.md`).

    python -m diffusers_fair.miniature.measure --output_dir DIR [--images_per_prompt 64] [--weights_dir W]

Writes `DIR/measurements.json`, `DIR/frequencies.json` (each occupation's data distributions, generated frequencies
and classifier agreement, for breakdowns the summary does not make) and `DIR/grid.png`. Everything is seeded;
attributes of generated images are read by the independent "eval" classifier (the "train" classifier's numbers are
reported too), context by the occupation classifier. Two numbers locate what a shortfall comes from: the correlation a
generator drawing exactly from the data's distributions would reach at the same number of images
(`correlation_ceiling`), and how often the U-Net keeps each attribute when it denoises a noised render of a known
person (`denoising_round_trip`).
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from ..metrics import bias_score
from ..utils import atomic_write_json
from .loading import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, load_classifier, load_pipeline
from .train import _vae_round_trip, classifier_accuracy
from .world import ATTRIBUTES, OCCUPATION_NAMES, OCCUPATIONS, OCCUPATIONS_HELDOUT, OCCUPATIONS_TRAIN, sample_dataset


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure the miniature world's base model and classifiers.")
    parser.add_argument("--output_dir", required=True, help="Folder for measurements.json and grid.png.")
    parser.add_argument("--weights_dir", default=None, help="Artefacts to measure; defaults to the shipped ones.")
    parser.add_argument("--images_per_prompt", type=int, default=64, help="Generated images per occupation.")
    parser.add_argument(
        "--num_train_occupations",
        type=int,
        default=None,
        help="Measure only the first N training occupations (all held-out ones are always measured); all if unset.",
    )
    parser.add_argument("--template", type=int, default=0, help="Index into TEMPLATES of the measured prompts.")
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--fresh_images_per_occupation", type=int, default=20, help="For classifier accuracy.")
    parser.add_argument(
        "--round_trip_strengths",
        type=float,
        nargs="*",
        default=[0.2, 0.3, 0.45],
        help="Denoising round trips: fresh renders noised to each of these fractions of the schedule (img2img "
        "strength) and denoised by the U-Net with their occupation's prompt at guidance 1; the eval classifier's "
        "accuracy on them says how often the U-Net keeps each attribute. The flag with no values skips them.",
    )
    parser.add_argument(
        "--round_trip_images_per_occupation", type=int, default=4, help="Renders per occupation in the round trips."
    )
    args = parser.parse_args(input_args)
    if args.round_trip_images_per_occupation < 1:
        raise ValueError(
            f"`--round_trip_images_per_occupation` must be >= 1, got {args.round_trip_images_per_occupation}; pass "
            "`--round_trip_strengths` with no values to skip the round trips."
        )
    for strength in args.round_trip_strengths:
        if not 0 < strength <= 1:
            raise ValueError(f"`--round_trip_strengths` must each be in (0, 1], got {strength}.")
    return args


def correlation_ceiling(
    distributions: np.ndarray, images_per_prompt: int, draws: int = 200, seed: int = 0
) -> tuple[float, float]:
    r"""
    The correlation with the data that a generator drawing exactly from the data's distributions reaches when each
    prompt gets `images_per_prompt` images: the ceiling sampling noise puts on the measured correlation.

    Args:
        distributions (`np.ndarray` of shape `(num_occupations, num_classes)`): each row a distribution.
        images_per_prompt (`int`): images drawn per occupation, >= 1.
        draws (`int`, *optional*, defaults to 200): simulated generators.
        seed (`int`, *optional*, defaults to 0): seed of the draws.

    Returns:
        `(mean, 5th percentile)` over the draws of Pearson's correlation, computed as `main` computes it (the second
        class's frequency for binary attributes, all classes otherwise).

    Raises:
        `ValueError`: `images_per_prompt` or `draws` is below 1.
    """
    if images_per_prompt < 1 or draws < 1:
        raise ValueError(f"`images_per_prompt` and `draws` must be >= 1, got {images_per_prompt} and {draws}.")
    rng = np.random.default_rng(seed)
    data = _frequency_vector(distributions)
    correlations = []
    for _ in range(draws):
        counts = np.stack([rng.multinomial(images_per_prompt, p / p.sum()) for p in distributions])
        correlations.append(np.corrcoef(data, _frequency_vector(counts / images_per_prompt))[0, 1])
    return float(np.mean(correlations)), float(np.percentile(correlations, 5))


def _frequency_vector(values: np.ndarray) -> np.ndarray:
    """The frequencies `(num_occupations, num_classes)` that a correlation compares, flattened."""
    # Binary attributes: the frequency of the second class only (both would double-count one number).
    return values[:, 1] if values.shape[1] == 2 else values.reshape(-1)


@torch.no_grad()
def main(input_args: list[str] | None = None) -> dict:
    args = parse_args(input_args)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    pipeline = load_pipeline(args.weights_dir)
    classifiers = {kind: load_classifier(kind, args.weights_dir) for kind in ("train", "eval", "context")}
    results: dict = {"settings": vars(args)}

    # 1. Generate images per occupation and classify them.
    train_occupations = OCCUPATIONS_TRAIN[: args.num_train_occupations]
    generated = {}
    start = time.time()
    for index, occupation in enumerate(OCCUPATIONS):
        if not occupation.heldout and occupation not in train_occupations:
            continue
        generator = torch.Generator().manual_seed(args.seed + index)
        generated[occupation.name] = pipeline(
            occupation.prompt(args.template),
            num_images_per_prompt=args.images_per_prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            output_type="pt",
        ).images
    results["generation_s"] = round(time.time() - start, 1)
    results["generated_images"] = sum(len(images) for images in generated.values())
    predictions = {kind: {} for kind in classifiers}
    for kind, model in classifiers.items():
        for name, images in generated.items():
            predictions[kind][name] = {a: logits.argmax(1) for a, logits in model(images).items()}

    # 2. Per-occupation frequencies, correlation with the data, bias.
    def frequencies(kind: str, occupations) -> dict[str, np.ndarray]:
        return {
            a: np.stack(
                [
                    np.bincount(predictions[kind][o.name][a].numpy(), minlength=len(classes)) / args.images_per_prompt
                    for o in occupations
                ]
            )
            for a, classes in ATTRIBUTES.items()
        }

    per_occupation = {}
    for split, occupations in (("train", train_occupations), ("heldout", OCCUPATIONS_HELDOUT)):
        data = {a: np.array([o.distributions[a] for o in occupations]) for a in ATTRIBUTES}
        for occupation in occupations:
            per_occupation[occupation.name] = {
                "split": split,
                "data": {a: list(occupation.distributions[a]) for a in ATTRIBUTES},
                "eval_train_agreement": {},
            }
        for kind in ("eval", "train"):
            gen = frequencies(kind, occupations)
            for row, occupation in enumerate(occupations):
                per_occupation[occupation.name][f"{kind}_classifier"] = {
                    a: [float(f) for f in gen[a][row]] for a in ATTRIBUTES
                }
            for attribute in ATTRIBUTES:
                x, y = _frequency_vector(data[attribute]), _frequency_vector(gen[attribute])
                results[f"{split}/{kind}_classifier/{attribute}/correlation"] = round(
                    float(np.corrcoef(x, y)[0, 1]), 4
                )
                results[f"{split}/{kind}_classifier/{attribute}/mean_bias_generated"] = round(
                    float(np.mean([bias_score(f) for f in gen[attribute]])), 4
                )
                results[f"{split}/{kind}_classifier/{attribute}/mean_abs_frequency_error"] = round(
                    float(np.abs(data[attribute] - gen[attribute]).mean()), 4
                )
        for attribute in ATTRIBUTES:
            results[f"{split}/data/{attribute}/mean_bias"] = round(
                float(np.mean([bias_score(f) for f in data[attribute]])), 4
            )
            mean, low = correlation_ceiling(data[attribute], args.images_per_prompt)
            results[f"{split}/perfect_generator/{attribute}/correlation_ceiling"] = round(mean, 4)
            results[f"{split}/perfect_generator/{attribute}/correlation_ceiling_5th_percentile"] = round(low, 4)
        context = [
            float((predictions["context"][o.name]["occupation"] == OCCUPATION_NAMES.index(o.name)).float().mean())
            for o in occupations
        ]
        results[f"{split}/context_preserved"] = round(float(np.mean(context)), 4)
        results[f"{split}/context_preserved_worst_occupation"] = round(float(np.min(context)), 4)

    # 3. Agreement of the eval classifier with the train classifier on generated images.
    for attribute in ATTRIBUTES:
        agree = [
            (predictions["train"][name][attribute] == predictions["eval"][name][attribute]).float().mean()
            for name in generated
        ]
        results[f"generated/eval_train_agreement/{attribute}"] = round(float(torch.stack(agree).mean()), 4)
        for name, share in zip(generated, agree):
            per_occupation[name]["eval_train_agreement"][attribute] = float(share)

    # 4. Classifier accuracy on fresh renders and on their VAE round-trips.
    fresh = sample_dataset(images_per_occupation=args.fresh_images_per_occupation, seed=args.seed + 99)
    round_trip = _vae_round_trip(pipeline.vae, fresh.images)
    for kind in ("train", "eval", "context"):
        labels = {"occupation": fresh.occupations} if kind == "context" else fresh.labels
        for name, images in (("fresh", fresh.images), ("vae_round_trip", round_trip)):
            for attribute, accuracy in classifier_accuracy(classifiers[kind], images, labels).items():
                results[f"classifier_{kind}/{name}/{attribute}/accuracy"] = round(accuracy, 4)

    # 5. Denoising round trips: does the U-Net keep a known person's attributes (guidance 1, own occupation's prompt)?
    if args.round_trip_strengths:
        people = sample_dataset(images_per_occupation=args.round_trip_images_per_occupation, seed=args.seed + 98)
        prompts = [OCCUPATIONS[int(o)].prompt(args.template) for o in people.occupations]
        img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipeline)
        img2img.set_progress_bar_config(disable=True)
        for strength in args.round_trip_strengths:
            denoised = img2img(
                prompts,
                image=people.images,
                strength=strength,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(args.seed),
                output_type="pt",
            ).images
            for attribute, accuracy in classifier_accuracy(classifiers["eval"], denoised, people.labels).items():
                results[f"denoising_round_trip/strength_{strength}/{attribute}/eval_accuracy"] = round(accuracy, 4)

    # 6. Throughput at batch 16, 20 steps (after one warm-up call).
    prompt = OCCUPATIONS[0].prompt(args.template)
    kwargs = dict(num_images_per_prompt=16, num_inference_steps=20, guidance_scale=args.guidance_scale)
    pipeline(prompt, **kwargs, output_type="pt")
    start, repeats = time.time(), 5
    for _ in range(repeats):
        pipeline(prompt, **kwargs, output_type="pt")
    results[f"throughput_images_per_s_batch16_20steps_{args.num_threads}thread"] = round(
        16 * repeats / (time.time() - start), 1
    )

    # 7. Grid: 8 images for 6 training and 6 held-out occupations, 3x nearest-neighbour upscaling.
    rows = train_occupations[:6] + OCCUPATIONS_HELDOUT[:6]
    grid = torch.cat([torch.cat(list(generated[o.name][:8]), dim=2) for o in rows], dim=1)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    picture = picture.resize((picture.width * 3, picture.height * 3), Image.NEAREST)
    picture.save(os.path.join(args.output_dir, "grid.png"))
    results["grid_rows"] = [o.name for o in rows]

    atomic_write_json(
        os.path.join(args.output_dir, "frequencies.json"),
        {"classes": ATTRIBUTES, "images_per_prompt": args.images_per_prompt, "occupations": per_occupation},
    )
    atomic_write_json(os.path.join(args.output_dir, "measurements.json"), results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
