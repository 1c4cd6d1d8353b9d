r"""
Why the adaptors shorten hair more readily than they lengthen it (miniature world): where the classifiers put the
`short` / `long` boundary, what reaching it costs in the semantics loss, and where adapted images end up.

    python benchmarks/hair_boundary.py [--pairs 4] [--classifiers train eval] [--lora DIR [DIR ...]] [--images 32]

Part 1, on renders (about 40 s on one thread). Each pair is one person drawn twice with the same seed, with `short`
and with `long` hair: the two images differ only in the rows of hair that fall below the cap to the shoulders. The
path between them grows the long hair row by row from the top (row `k` of `n`: the long image's first `k` differing
rows, the short image's below them). Printed for each `k`, averaged over the pairs: each classifier's probability of
`long` and logit margin (`long` minus `short`; `train` is the classifier the alignment loss trains against), and the
semantics loss's distance (miniature CLIP + DINO, `sum (1 - cos)`, as `ImageSemanticsLoss` computes it) to each
end. Then the cost of a flip: per pair, the pixels changed and the semantics distance from the short image to the
first image the classifier reads `long`, against those from the long image to the last one it reads `short`. Last,
the direction of each classifier's input gradient at either end, which is where the alignment loss moves the pixels.

Part 2, with `--lora` (about 1 min per adaptor on one thread). For each adaptor folder, the held-out occupations'
images with and without it from the same noise (8 steps, guidance 3, as the demo trains and evaluates), grouped by the
base model's majority: the fraction of images in four bands of the eval classifier's margin (`< -10` is a clear
`short`, `-10..0` a `short` the classifier reads as less certain) and its `long` fraction. The eval classifier, not
the train one, so that adaptors trained against different train classifiers are measured alike.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_fair import AttributeClassifier
from diffusers_fair.miniature import (
    ATTRIBUTES,
    OCCUPATIONS,
    OCCUPATIONS_HELDOUT,
    hair_growth,
    load_classifier,
    load_clip,
    load_dino,
)
from diffusers_fair.semantics import ImageSemanticsLoss

BANDS = (-np.inf, -10.0, 0.0, 10.0, np.inf)
BAND_NAMES = ("< -10", "-10..0", "0..10", "> 10")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=4, help="Pairs (seeds) per occupation in part 1.")
    parser.add_argument(
        "--classifiers",
        nargs="+",
        default=["train", "eval"],
        help="Part 1's classifiers: 'train', 'eval' (the shipped ones) or AttributeClassifier folders.",
    )
    parser.add_argument("--lora", nargs="*", default=[], help="Adaptor folders of train_fair_lora.py (part 2).")
    parser.add_argument("--images", type=int, default=32, help="Images per held-out occupation in part 2.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(input_args)
    if args.pairs < 1 or args.images < 1:
        raise ValueError(f"`--pairs` and `--images` must be positive, got {args.pairs} and {args.images}.")
    return args


def hair_paths(pairs_per_occupation):
    """Per pair, the images `(n + 1, 3, 32, 32)` from short (0) to long (n), growing the hair row by row."""
    skin, age = ATTRIBUTES["skin"], ATTRIBUTES["age"]
    return [
        hair_growth(occupation, skin[pair % len(skin)], age[pair % len(age)], 1000 * index + pair)
        for index, occupation in enumerate(OCCUPATIONS)
        for pair in range(pairs_per_occupation)
    ]


def part_1(args, classifiers, semantics):
    paths = hair_paths(args.pairs)
    lengths = {len(p) for p in paths}
    if len(lengths) != 1:
        raise RuntimeError(f"Pairs differ in their number of hair rows ({sorted(lengths)}); cannot average by row.")
    probs = {name: [] for name in classifiers}
    margins = {name: [] for name in classifiers}
    to_short, to_long, changed = [], [], []
    with torch.no_grad():
        for path in paths:
            for name, classifier in classifiers.items():
                logits = classifier(path)["hair"]
                probs[name].append(logits.softmax(-1)[:, 1].numpy())
                margins[name].append((logits[:, 1] - logits[:, 0]).numpy())
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
        print(f"{'P(long), ' + name:<30}" + "".join(f"{v:6.2f}" for v in np.mean(probs[name], 0)))
        print(f"{'margin, ' + name:<30}" + "".join(f"{v:6.1f}" for v in np.mean(margins[name], 0)))
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

    print(
        "\nWhere each classifier's gradient points at either end (the alignment loss moves pixels along it): its "
        "cosine with the change to the other end, and the share of its energy on the pixels that change (the hair):"
    )
    for name, classifier in classifiers.items():
        cosines, shares = {"short": [], "long": []}, {"short": [], "long": []}
        for path in paths:
            change = path[-1] - path[0]  # short -> long
            hair = (change != 0).any(dim=0)
            for end, image, sign in (("short", path[0], 1.0), ("long", path[-1], -1.0)):
                image = image[None].clone().requires_grad_(True)
                logits = classifier(image)["hair"]
                (gradient,) = torch.autograd.grad(sign * (logits[0, 1] - logits[0, 0]), image)
                energy = gradient[0].pow(2).sum(dim=0)
                cosines[end].append(F.cosine_similarity(gradient.flatten(), sign * change.flatten(), dim=0).item())
                shares[end].append((energy[hair].sum() / energy.sum()).item())
        print(
            f"  {name}: at the short image, towards `long`: cosine {np.mean(cosines['short']):.2f}, "
            f"{np.mean(shares['short']):.0%} on the hair; at the long image, towards `short`: cosine "
            f"{np.mean(cosines['long']):.2f}, {np.mean(shares['long']):.0%} on the hair"
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
            logits = classifiers["eval"](images)["hair"]
        return (logits[:, 1] - logits[:, 0]).numpy(), (logits[:, 1] > logits[:, 0]).float().mean().item()

    print(f"\nPart 2: held-out occupations, {args.images} images each, same noise with and without the adaptor.")
    print("Eval classifier's margin (long - short) in bands, fraction of images; its `long` fraction.\n")
    pipe = load_pipeline()
    # The base model's images are the same for every adaptor (same noise): generated once.
    base = {occupation.name: measure(pipe, occupation) for occupation in OCCUPATIONS_HELDOUT}
    for folder in args.lora:
        pipe.load_lora_weights(folder, adapter_name="fair")
        rows = {o.name: (base[o.name], measure(pipe, o)) for o in OCCUPATIONS_HELDOUT}
        pipe.unload_lora_weights()
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
    shipped = {kind: load_classifier(kind).eval() for kind in ("train", "eval")}
    classifiers = {
        name: shipped[name] if name in shipped else AttributeClassifier.from_pretrained(name).eval()
        for name in args.classifiers
    }
    semantics = ImageSemanticsLoss({"clip": load_clip()[0], "dino": load_dino()})
    part_1(args, classifiers, semantics)
    if args.lora:
        part_2(args, shipped)


if __name__ == "__main__":
    main()
