r"""
Why the adaptors shorten hair more readily than they lengthen it (miniature world): where the classifiers put the
`short` / `long` boundary, what reaching it costs in the semantics loss, and where adapted images end up.

    python benchmarks/hair_boundary.py [--pairs 4] [--lora DIR [DIR ...]] [--images 32] [--threads 1]

Part 1, on renders (about 30 s on one thread). Each pair is one person drawn twice with the same seed, with `short` and with
`long` hair: the two images differ only in the rows of hair that fall below the cap to the shoulders. The path
between them grows the long hair row by row from the top (row `k` of `n`: the long image's first `k` differing rows,
the short image's below them). Printed for each `k`, averaged over the pairs: the probability of `long` under the
train classifier (the one the alignment loss trains against) and the eval classifier, the train classifier's logit
margin (`long` minus `short`), and the semantics loss's distance (miniature CLIP + DINO, `sum (1 - cos)`, as
`ImageSemanticsLoss` computes it) to each end. Then the cost of a flip: per pair, the pixels changed and the semantics
distance from the short image to the first image the classifier reads `long`, against those from the long image to
the last one it reads `short`.

Part 2, with `--lora` (about 1 min per adaptor on one thread). For each adaptor folder, the held-out occupations'
images with and without it from the same noise (8 steps, guidance 3, as the demo trains and evaluates), grouped by the
base model's majority: the fraction of images in four bands of the train classifier's margin (`< -10` is a clear
`short`, `-10..0` a `short` the classifier reads as less certain) and the eval classifier's `long` fraction.
"""

import argparse

import numpy as np
import torch

from diffusers_fair.miniature import OCCUPATIONS, OCCUPATIONS_HELDOUT, load_classifier, load_clip, load_dino, render
from diffusers_fair.semantics import ImageSemanticsLoss

SKINS = ("light", "medium", "tan", "dark")
BANDS = (-np.inf, -10.0, 0.0, 10.0, np.inf)
BAND_NAMES = ("< -10", "-10..0", "0..10", "> 10")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=4, help="Pairs (seeds) per occupation in part 1.")
    parser.add_argument("--lora", nargs="*", default=[], help="Adaptor folders of train_fair_lora.py (part 2).")
    parser.add_argument("--images", type=int, default=32, help="Images per held-out occupation in part 2.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(input_args)
    if args.pairs < 1 or args.images < 1:
        raise ValueError(f"`--pairs` and `--images` must be positive, got {args.pairs} and {args.images}.")
    return args


def hair_paths(pairs_per_occupation):
    """Per pair, the images `(n + 1, 3, 32, 32)` from short (row 0) to long (row n), growing the hair row by row."""
    paths = []
    for index, occupation in enumerate(OCCUPATIONS):
        for pair in range(pairs_per_occupation):
            seed, skin, age = 1000 * index + pair, SKINS[pair % 4], ("young", "old")[pair % 2]
            short, long = render(occupation, "short", skin, age, seed), render(occupation, "long", skin, age, seed)
            rows = torch.nonzero((short != long).any(dim=(0, 2))).flatten().tolist()
            steps = [short]
            for row in rows:  # the long image's rows down to `row`, the short image's below
                image = steps[-1].clone()
                image[:, row] = long[:, row]
                steps.append(image)
            if not torch.equal(steps[-1], long):
                raise RuntimeError("The short and long renders of one seed must differ only in whole rows of hair.")
            paths.append(torch.stack(steps))
    return paths


def part_1(args, classifiers, semantics):
    paths = hair_paths(args.pairs)
    lengths = {len(p) for p in paths}
    if len(lengths) != 1:
        raise RuntimeError(f"Pairs differ in their number of hair rows ({sorted(lengths)}); cannot average by row.")
    probs = {name: [] for name in classifiers}
    margins, to_short, to_long, changed = [], [], [], []
    with torch.no_grad():
        for path in paths:
            for name, classifier in classifiers.items():
                logits = classifier(path)["hair"]
                probs[name].append(logits.softmax(-1)[:, 1].numpy())
                if name == "train":
                    margins.append((logits[:, 1] - logits[:, 0]).numpy())
            _, d_short = semantics(path, path[:1].expand_as(path))
            _, d_long = semantics(path, path[-1:].expand_as(path))
            to_short.append(sum(d_short.values()).numpy())
            to_long.append(sum(d_long.values()).numpy())
            changed.append((path != path[:1]).any(dim=1).flatten(1).sum(dim=1).numpy())  # pixels unlike the short
    n = lengths.pop() - 1
    print(f"Part 1: {len(paths)} pairs (52 occupations x {args.pairs}), {n} rows of long hair below the cap.\n")
    header = f"{'rows of long hair grown':<30}" + "".join(f"{k:>6d}" for k in range(n + 1))
    print(header)
    for name in classifiers:
        print(f"{'P(long), ' + name + ' classifier':<30}" + "".join(f"{v:6.2f}" for v in np.mean(probs[name], 0)))
    print(f"{'margin, train classifier':<30}" + "".join(f"{v:6.1f}" for v in np.mean(margins, 0)))
    # 1 - cos of an image with itself can round to -0.000.
    print(f"{'distance to the short image':<30}" + "".join(f"{v:6.3f}" for v in np.maximum(np.mean(to_short, 0), 0)))
    print(f"{'distance to the long image':<30}" + "".join(f"{v:6.3f}" for v in np.maximum(np.mean(to_long, 0), 0)))
    print("\nCost of a flip (mean over the pairs whose path crosses the classifier's boundary):")
    for name in classifiers:
        flips = [
            (int(np.argmax(p >= 0.5)), d_s, d_l, c)
            for p, d_s, d_l, c in zip(probs[name], to_short, to_long, changed)
            if p[-1] >= 0.5 and p[0] < 0.5
        ]
        first = np.array([f[0] for f in flips])
        # Short image -> the first image read `long`, against long image -> the last image read `short`.
        lengthen, shorten = (
            np.mean([d_s[k] for k, d_s, _, _ in flips]),
            np.mean([d_l[k - 1] for k, _, d_l, _ in flips]),
        )
        pixels_up, pixels_down = (
            np.mean([c[k] for k, *_, c in flips]),
            np.mean([c[-1] - c[k - 1] for k, *_, c in flips]),
        )
        print(
            f"  {name} classifier: reads `long` from row {first.mean():.1f} of {n} (sd {first.std():.1f}, "
            f"{len(flips)} pairs). To the flip, lengthening changes {pixels_up:.0f} pixels at a semantics distance "
            f"of {lengthen:.3f}, shortening {pixels_down:.0f} pixels at {shorten:.3f} ({lengthen / shorten:.1f}x)."
        )


def part_2(args, classifiers):
    from diffusers_fair.miniature import load_pipeline

    sample = {"num_inference_steps": 8, "guidance_scale": 3.0, "output_type": "pt"}

    def measure(pipe, occupation):
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            images = pipe(
                occupation.prompt(0), num_images_per_prompt=args.images, generator=generator, **sample
            ).images
            logits = classifiers["train"](images)["hair"]
            eval_long = classifiers["eval"](images)["hair"].argmax(-1).float().mean().item()
        return (logits[:, 1] - logits[:, 0]).numpy(), eval_long

    print(f"\nPart 2: held-out occupations, {args.images} images each, same noise with and without the adaptor.")
    print(
        "Train classifier's margin (long - short) in bands, fraction of images; eval classifier's `long` fraction.\n"
    )
    for folder in args.lora:
        pipe = load_pipeline()
        pipe.load_lora_weights(folder, adapter_name="fair")
        rows = {}
        for occupation in OCCUPATIONS_HELDOUT:
            pipe.disable_lora()
            base = measure(pipe, occupation)
            pipe.enable_lora()
            rows[occupation.name] = (base, measure(pipe, occupation))
        print(folder)
        print(
            f"  {'occupations (base majority)':<34}{'':9}" + "".join(f"{b:>8}" for b in BAND_NAMES) + "  eval `long`"
        )
        for majority in ("short", "long"):
            names = [n for n, (base, _) in rows.items() if (base[1] >= 0.5) == (majority == "long")]
            for which, label in ((0, "base"), (1, "adapted")):
                margins = np.concatenate([rows[n][which][0] for n in names])
                bands = np.histogram(margins, BANDS)[0] / len(margins)
                eval_long = np.mean([rows[n][which][1] for n in names])
                print(
                    f"  {majority + ' (' + str(len(names)) + ')':<34}{label:9}"
                    + "".join(f"{v:8.2f}" for v in bands)
                    + f"{eval_long:13.2f}"
                )


def main(input_args=None):
    args = parse_args(input_args)
    torch.set_num_threads(args.threads)
    classifiers = {kind: load_classifier(kind).eval() for kind in ("train", "eval")}
    semantics = ImageSemanticsLoss({"clip": load_clip()[0], "dino": load_dino()})
    part_1(args, classifiers, semantics)
    if args.lora:
        part_2(args, classifiers)


if __name__ == "__main__":
    main()
