r"""
Train an attribute classifier on labelled faces: a linear head per attribute over a transformers vision encoder.

```bash
python -m diffusers_fair.classifiers.train --pretrained_model_name_or_path facebook/dinov2-small \
    --data fairface --labels fairface/fairface_label_train.csv --attributes gender,race,age --output_dir clf
```

Labels come in FairFace's CSV layout (`file,age,gender,race[,service_test]`, files relative to `--data`) or CelebA's
`list_attr_celeba.txt` (gender from `Male`, age from `Young`; CelebA has no race). Classes follow the paper: gender
{male, female}; race {WMELH, Asian, Black, Indian} (WMELH = White + Middle Eastern + Latino_Hispanic, Asian = East +
Southeast Asian); age {young, old} with young = FairFace's groups 0-2 to 30-39. The images should be face crops
(FairFace's and CelebA's aligned images are). The result is an [`AttributeClassifier`] folder (safetensors), with the
class-balanced accuracy of each attribute on a held-out validation split in `metrics.json`.
"""

import argparse
import csv
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import atomic_write_json, check_processes_joined
from .face_attribute import FaceAttributeClassifier

IGNORE_INDEX = -100  # label of an attribute that a row does not have (CrossEntropyLoss' default ignore_index)

ATTRIBUTE_CLASSES: dict[str, list[str]] = {
    "gender": ["male", "female"],
    "race": ["WMELH", "Asian", "Black", "Indian"],
    "age": ["young", "old"],
}
FAIRFACE_GENDER = {"Male": "male", "Female": "female"}
FAIRFACE_RACE = {
    "White": "WMELH",
    "Middle Eastern": "WMELH",
    "Latino_Hispanic": "WMELH",
    "East Asian": "Asian",
    "Southeast Asian": "Asian",
    "Black": "Black",
    "Indian": "Indian",
}
FAIRFACE_AGE = {
    **dict.fromkeys(["0-2", "3-9", "10-19", "20-29", "30-39"], "young"),
    **dict.fromkeys(["40-49", "50-59", "60-69", "more than 70", "70+"], "old"),
}
FAIRFACE_MAPS = {"gender": FAIRFACE_GENDER, "race": FAIRFACE_RACE, "age": FAIRFACE_AGE}


def read_fairface_labels(path: str | os.PathLike, attributes: Sequence[str]) -> list[dict]:
    r"""
    Reads FairFace's label CSV (`file,age,gender,race[,service_test]`) into the paper's groups.

    Returns:
        `list[dict]`: per row `{"file": str, attribute: class index}` for each of `attributes` (indices into
        `ATTRIBUTE_CLASSES[attribute]`; `IGNORE_INDEX` for an empty cell).
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("file", *attributes) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"`labels` {str(path)!r} has no column(s) {missing}; FairFace's layout is file,age,gender,race."
            )
        for line, row in enumerate(reader, start=2):
            item = {"file": row["file"]}
            for attribute in attributes:
                value = row[attribute].strip()
                if not value:
                    item[attribute] = IGNORE_INDEX
                    continue
                group = FAIRFACE_MAPS[attribute].get(value)
                if group is None:
                    raise ValueError(
                        f"`labels` {str(path)!r} line {line}: unknown {attribute} {value!r}; FairFace's values are "
                        f"{sorted(FAIRFACE_MAPS[attribute])}."
                    )
                item[attribute] = ATTRIBUTE_CLASSES[attribute].index(group)
            rows.append(item)
    return rows


def read_celeba_labels(path: str | os.PathLike, attributes: Sequence[str]) -> list[dict]:
    r"""
    Reads CelebA's `list_attr_celeba.txt` (a count line, a header of 40 attribute names, then `file v1 ... v40` with
    values 1 / -1): gender from `Male`, age from `Young` (CelebA's young/old is a perceived label, not an age).
    """
    if "race" in attributes:
        raise ValueError("CelebA has no race labels: drop `race` from `--attributes` or use FairFace's labels.")
    with open(path, encoding="utf-8") as f:
        lines = [line.split() for line in f if line.strip()]
    header = lines[1]
    columns = {"gender": header.index("Male"), "age": header.index("Young")}
    rows = []
    for parts in lines[2:]:
        values = parts[1:]
        item = {"file": parts[0]}
        if "gender" in attributes:
            item["gender"] = ATTRIBUTE_CLASSES["gender"].index(
                "male" if values[columns["gender"]] == "1" else "female"
            )
        if "age" in attributes:
            item["age"] = ATTRIBUTE_CLASSES["age"].index("young" if values[columns["age"]] == "1" else "old")
        rows.append(item)
    return rows


def read_labels(path: str | os.PathLike, attributes: Sequence[str], label_format: str = "auto") -> list[dict]:
    """FairFace CSV or CelebA attribute file, by `label_format` (`"auto"`: CelebA when the file is not a CSV)."""
    if label_format == "auto":
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        label_format = "fairface" if "," in first else "celeba"
    if label_format == "fairface":
        return read_fairface_labels(path, attributes)
    if label_format == "celeba":
        return read_celeba_labels(path, attributes)
    raise ValueError(f"`label_format` must be 'auto', 'fairface' or 'celeba', got {label_format!r}.")


def balanced_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    r"""
    Class-balanced metrics of one attribute: the mean over classes present in `labels` of their recall.

    Returns:
        `dict` with `balanced_accuracy`, `accuracy`, `recall` (class index -> recall, present classes) and `count`.
    """
    keep = labels != IGNORE_INDEX
    predictions, labels = predictions[keep], labels[keep]
    recall = {int(k): float((predictions[labels == k] == k).mean()) for k in range(num_classes) if (labels == k).any()}
    return {
        "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else float("nan"),
        "accuracy": float((predictions == labels).mean()) if labels.size else float("nan"),
        "recall": recall,
        "count": int(labels.size),
    }


def load_image(path: str, resolution: int) -> torch.Tensor:
    """`(3, resolution, resolution)` float in `[0, 1]` (bilinear resize of the whole image)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--pretrained_model_name_or_path", required=True, help="transformers vision model (Hub name or folder)."
    )
    parser.add_argument("--data", required=True, help="Folder the label file's image paths are relative to.")
    parser.add_argument("--labels", required=True, help="FairFace CSV or CelebA list_attr_celeba.txt.")
    parser.add_argument("--label_format", default="auto", choices=["auto", "fairface", "celeba"])
    parser.add_argument("--attributes", default="gender,race,age", help="Comma-separated, from gender, race, age.")
    parser.add_argument(
        "--output_dir", "--output", dest="output_dir", required=True, help="Where the classifier goes."
    )
    parser.add_argument("--resolution", type=int, default=None, help="Input side; default: the encoder's image_size.")
    parser.add_argument("--train_batch_size", type=int, default=32, help="Images per step and process.")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Learning rate of the heads.")
    parser.add_argument("--finetune_backbone", action="store_true", help="Also train the encoder (default: frozen).")
    parser.add_argument("--backbone_learning_rate", type=float, default=1e-5)
    parser.add_argument("--validation_fraction", type=float, default=0.1, help="Held-out share of the rows.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args(input_args)
    args.attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    unknown = [a for a in args.attributes if a not in ATTRIBUTE_CLASSES]
    if not args.attributes or unknown:
        raise ValueError(
            f"`--attributes` must be a comma-separated subset of {list(ATTRIBUTE_CLASSES)}, got {unknown}."
        )
    if not 0.0 < args.validation_fraction < 1.0:
        raise ValueError(f"`--validation_fraction` must be in (0, 1), got {args.validation_fraction}.")
    for name in ("train_batch_size", "num_train_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {getattr(args, name)}.")
    return args


def main(args: argparse.Namespace) -> dict:
    r"""Trains, evaluates on the validation split, writes the classifier and `metrics.json`; returns the metrics."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    # A finetuned encoder may hold parameters its forward pass never uses (Dinov2Model's `mask_token`), which DDP
    # refuses unless told to look for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=args.finetune_backbone)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, kwargs_handlers=[ddp])
    check_processes_joined(accelerator)
    set_seed(args.seed)
    rows = read_labels(args.labels, args.attributes, args.label_format)
    if len(rows) < 2:
        raise ValueError(f"`--labels` {args.labels!r} has {len(rows)} rows; training needs at least 2.")
    missing = [r["file"] for r in rows if not os.path.isfile(os.path.join(args.data, r["file"]))]
    if missing:
        raise ValueError(f"{len(missing)} labelled files are not under `--data` {args.data!r}, e.g. {missing[:3]}.")
    attributes = {name: ATTRIBUTE_CLASSES[name] for name in args.attributes}
    model = FaceAttributeClassifier.from_backbone(args.pretrained_model_name_or_path, attributes, args.resolution)
    resolution = model.config["image_size"]

    order = np.random.default_rng(args.seed).permutation(len(rows))
    num_val = min(len(rows) - 1, max(1, round(args.validation_fraction * len(rows))))
    splits = {"validation": order[:num_val], "train": order[num_val:]}

    # Read per batch, never all at once (FairFace's 86,744 training faces would take 52 GB as float32 at 224 px).
    def load_images(index) -> torch.Tensor:
        return torch.stack([load_image(os.path.join(args.data, rows[i]["file"]), resolution) for i in index])

    labels = torch.tensor([[r[a] for a in args.attributes] for r in rows], dtype=torch.long)

    model.features.requires_grad_(args.finetune_backbone)
    groups = [{"params": model.heads.parameters(), "lr": args.learning_rate}]
    if args.finetune_backbone:
        groups.append({"params": model.features.parameters(), "lr": args.backbone_learning_rate})
    optimizer = torch.optim.AdamW(groups)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Each step takes `train_batch_size` images per process: every process draws the same permutation and flips (one
    # seed) and keeps its share of the step's images; the gradients are averaged (the model is wrapped for DDP).
    rank, num_processes = accelerator.process_index, accelerator.num_processes
    if len(splits["train"]) < num_processes:
        raise ValueError(
            f"{len(splits['train'])} training rows cannot give each of {num_processes} processes an image: lower "
            "`--validation_fraction` or launch fewer processes."
        )
    global_batch_size = args.train_batch_size * num_processes
    steps_per_epoch = math.ceil(len(splits["train"]) / global_batch_size)
    max_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    generator = torch.Generator().manual_seed(args.seed)
    step, losses = 0, []
    model.train()
    while step < max_steps:
        permutation = splits["train"][torch.randperm(len(splits["train"]), generator=generator).numpy()]
        for start in range(0, len(permutation), global_batch_size):
            chunk = permutation[start : start + global_batch_size]
            flip = torch.rand(len(chunk), generator=generator) < 0.5  # horizontal flips: faces are symmetric
            if len(chunk) < num_processes:  # too few images left for every process to have one
                break
            index, flip = chunk[rank::num_processes], flip[rank::num_processes]
            batch = load_images(index).to(accelerator.device)
            batch = torch.where(flip.view(-1, 1, 1, 1).to(batch.device), batch.flip(-1), batch)
            logits = model(batch)
            target = labels[index].to(accelerator.device)
            # Mean over the labelled images of each attribute; an attribute with none in this batch adds zero but
            # stays in the graph (with several processes, DDP needs every head to take part in every step).
            loss = sum(
                F.cross_entropy(logits[a].float(), target[:, i], ignore_index=IGNORE_INDEX, reduction="sum")
                / (target[:, i] != IGNORE_INDEX).sum().clamp(min=1)
                for i, a in enumerate(args.attributes)
            )
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= max_steps:
                break

    model.eval()
    predictions = {a: [] for a in args.attributes}
    with torch.no_grad():
        for start in range(0, num_val, args.train_batch_size):
            index = splits["validation"][start : start + args.train_batch_size]
            logits = model(load_images(index).to(accelerator.device))
            for a in args.attributes:
                predictions[a].append(logits[a].argmax(dim=1).cpu())
    val_labels = labels[splits["validation"]].numpy()
    metrics = {
        "validation": {
            a: balanced_accuracy(torch.cat(predictions[a]).numpy(), val_labels[:, i], len(attributes[a]))
            | {"classes": attributes[a]}
            for i, a in enumerate(args.attributes)
        },
        "num_train": int(len(splits["train"])),
        "num_validation": int(num_val),
        "train_steps": step,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        atomic_write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args())
