r"""
Where the fairness loss's first update moves the model, against where an attribute word moves it (miniature world).

    python benchmarks/update_direction.py [--finetune text_encoder_lora unet_lora] [--images 32] [--threads 1]

The finetuning can only generalise to held-out occupations if its updates move the model along something all
occupations share. This script measures that on the shipped miniature world, in two columns side by side:

- baseline, "word": the text encoder's output for "a photo of the face of a {occupation}, a person" is moved along the
  attribute word's direction `W`, the mean over eight training occupations of E("... a long-haired {occupation} ...")
  - E("... a {occupation} ..."), on the positions after every prompt's last token (which, with the causal mask,
  summarise the whole prompt). `W` is shared across occupations (its per-occupation cosines are printed).
- "update": the first AdamW step of the distributional alignment loss (`hair=uniform`, no semantics loss) on the
  adaptor of `--finetune`, from two batches of 12 images of each of four `short`-skewed training occupations; AdamW's
  first step is `lr * sign(gradient)`, applied at several learning rates.

For each, on three `short`-skewed held-out occupations and the four training ones: the fraction of `long` images (train
classifier) and the fraction whose occupation (context classifier) is the base model's for the same noise; for the
text-encoder adaptor also the cosine between its change of the text encoder's output and `W`. 8 steps, guidance 3,
as the demo trains. About 2 minutes per adaptor on one CPU thread.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from diffusers_fair import DistributionalAlignmentLoss, TargetDistribution
from diffusers_fair.miniature import load_classifier, load_pipeline
from diffusers_fair.training import FairFinetuningObjective, add_fair_adapters

PROMPT = "a photo of the face of a {}, a person"
WORD_OCCUPATIONS = ["pilot", "scientist", "firefighter", "judge", "dancer", "librarian", "nurse", "doctor"]
TRAIN = ["pilot", "firefighter", "engineer", "scientist"]  # P(long) = 0.1 in the data
HELDOUT = ["guard", "surgeon", "miner"]  # P(long) = 0.1 in the data, never seen by fairness finetuning


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--finetune", nargs="+", default=["text_encoder_lora", "unet_lora"])
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--images", type=int, default=32, help="Images per occupation and measurement.")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(input_args)


def main(input_args=None):
    args = parse_args(input_args)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline()
    classifier, context = load_classifier("train"), load_classifier("context")
    negative = pipe.encode_prompt("", "cpu", 1, False)[0]  # the base model's empty prompt
    sample = {"height": 32, "width": 32, "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}

    def encode(occupation, word=""):
        with torch.no_grad():
            return pipe.encode_prompt(PROMPT.format(word + occupation), "cpu", 1, False)[0]

    @torch.no_grad()
    def measure(occupation, embeds=None):
        kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative} if embeds is not None else {}
        images = pipe(
            prompt=None if embeds is not None else [PROMPT.format(occupation)],
            num_images_per_prompt=args.images,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
            **sample,
            **kwargs,
        ).images.float()
        long = (classifier(images)["hair"].argmax(-1) == 1).float()
        return float(long.mean()), context(images)["occupation"].argmax(-1)

    start = max(len(pipe.tokenizer(PROMPT.format("long-haired " + o)).input_ids) for o in WORD_OCCUPATIONS)
    shifts = [encode(o, "long-haired ")[0, start:] - encode(o)[0, start:] for o in WORD_OCCUPATIONS]
    word = torch.stack(shifts).mean(0)
    shared = [F.cosine_similarity(s.flatten(), word.flatten(), dim=0).item() for s in shifts]
    base_embeds = {o: encode(o) for o in HELDOUT + TRAIN}
    base = {o: measure(o, base_embeds[o]) for o in HELDOUT + TRAIN}
    results = {
        "settings": vars(args),
        "word_direction_cosine_per_occupation": dict(zip(WORD_OCCUPATIONS, [round(c, 3) for c in shared])),
        "base_long": {o: round(base[o][0], 3) for o in base},
    }
    print(f"W vs each occupation's own word shift: cosine {min(shared):.2f} to {max(shared):.2f}")
    print("base model, fraction long:", results["base_long"])

    def row(o, long, classes, cosine=None):
        kept = float((classes == base[o][1]).float().mean())
        return {
            "long": round(long, 3),
            "context_kept": round(kept, 3),
            **({} if cosine is None else {"cos_W": cosine}),
        }

    results["word"] = {}
    for scale in (1.0, 2.0):
        cells = {}
        for o in HELDOUT:
            embeds = encode(o).clone()
            embeds[0, start:] += scale * word
            cells[o] = row(o, *measure(o, embeds))
        results["word"][f"{scale:g}W"] = cells
        print(
            f"word  +{scale:g}W        "
            + "  ".join(f"{o}: long {c['long']:.2f} ctx {c['context_kept']:.2f}" for o, c in cells.items())
        )

    objective = FairFinetuningObjective(
        classifier,
        DistributionalAlignmentLoss(
            TargetDistribution.from_string("hair=uniform", attributes=classifier.attributes),
            0.6,
            classifier.attributes,
            seed=0,
        ),
    )
    for finetune in args.finetune:
        pipe = load_pipeline()  # a fresh base model for each adaptor
        torch.manual_seed(0)
        adapters = add_fair_adapters(pipe, finetune, rank=8)
        params = adapters.parameters()
        gradient = [torch.zeros_like(p) for p in params]
        for o in TRAIN:
            for seed in (100, 101):
                out = pipe(
                    prompt=[PROMPT.format(o)],
                    num_images_per_prompt=12,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="pt",
                    gradient="biased",
                    **sample,
                )
                loss, _ = objective(out.images.float(), None)
                for total, g in zip(gradient, torch.autograd.grad(loss, params, allow_unused=True)):
                    if g is not None:
                        total += g
        initial = [p.detach().clone() for p in params]
        results[finetune] = {}
        for lr in args.learning_rates:
            with torch.no_grad():
                for p, g, p0 in zip(params, gradient, initial):
                    p.copy_(p0 - lr * g.sign())
            cells = {}
            for o in HELDOUT + TRAIN:
                cosine = None
                if "text_encoder" in finetune:
                    change = (encode(o) - base_embeds[o])[0, start:]
                    cosine = round(F.cosine_similarity(change.flatten(), word.flatten(), dim=0).item(), 3)
                # The pipeline encodes the prompt through the adaptor itself.
                cells[o] = row(o, *measure(o), cosine)
            results[finetune][f"lr={lr:g}"] = cells
            print(
                f"{finetune} lr {lr:g}  "
                + "  ".join(
                    f"{o}: long {c['long']:.2f} ctx {c['context_kept']:.2f}"
                    + (f" cos {c['cos_W']:+.2f}" if "cos_W" in c else "")
                    for o, c in cells.items()
                )
            )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
