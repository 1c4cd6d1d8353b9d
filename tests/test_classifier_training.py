"""Classifier training on a small labelled folder in FairFace's layout, drawn by the miniature world's renderer."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_fair.classifiers import AttributeClassifier, FaceAttributeClassifier
from diffusers_fair.classifiers.train import (
    ATTRIBUTE_CLASSES,
    balanced_accuracy,
    main,
    parse_args,
    read_celeba_labels,
    read_fairface_labels,
)
from diffusers_fair.miniature import render
from tests.tiny_models import tiny_dino_model

# The miniature world's attributes stand in for FairFace's (they are drawn, not photographed): long hair -> "Female",
# skin tone -> a FairFace race (two raw races per group, to exercise the paper's grouping), grey hair -> an old age.
GENDER = {"short": "Male", "long": "Female"}
RACE = {"light": ["White", "Latino_Hispanic"], "medium": ["East Asian", "Southeast Asian"], "tan": ["Indian"]}
RACE["dark"] = ["Black"]
AGE = {"young": ["20-29", "3-9"], "old": ["60-69", "more than 70"]}


def write_fairface_folder(folder, n: int = 96, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "train"))
    rows = []
    for i in range(n):
        hair, skin, age = rng.choice(["short", "long"]), rng.choice(list(RACE)), rng.choice(["young", "old"])
        image = render("doctor", hair=hair, skin=skin, age=age, generator=int(rng.integers(1 << 30)))
        name = f"train/{i}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            os.path.join(folder, name)
        )
        race, age_group = rng.choice(RACE[skin]), rng.choice(AGE[age])
        rows.append({"file": name, "age": age_group, "gender": GENDER[hair], "race": race, "service_test": "True"})
    with open(os.path.join(folder, "labels.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "age", "gender", "race", "service_test"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_fairface_reader_groups_races_and_ages(tmp_path):
    rows = write_fairface_folder(tmp_path, n=12)
    labels = read_fairface_labels(tmp_path / "labels.csv", ["gender", "race", "age"])
    groups = {"White": "WMELH", "Latino_Hispanic": "WMELH", "East Asian": "Asian", "Southeast Asian": "Asian"}
    groups |= {"Indian": "Indian", "Black": "Black"}
    for raw, parsed in zip(rows, labels):
        assert parsed["file"] == raw["file"]
        assert ATTRIBUTE_CLASSES["race"][parsed["race"]] == groups[raw["race"]]
        assert ATTRIBUTE_CLASSES["gender"][parsed["gender"]] == raw["gender"].lower()
        young = raw["age"] in ("20-29", "3-9")
        assert ATTRIBUTE_CLASSES["age"][parsed["age"]] == ("young" if young else "old")
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("file,age,gender,race\na.png,20-29,Male,Martian\n")
    with pytest.raises(ValueError, match="line 2: unknown race 'Martian'"):
        read_fairface_labels(tmp_path / "bad.csv", ["race"])


def test_celeba_reader(tmp_path):
    names = ["5_o_Clock_Shadow", "Male", "Smiling", "Young"]
    text = "2\n" + " ".join(names) + "\n000001.jpg -1 -1  1  1\n000002.jpg  1  1 -1 -1\n"
    (tmp_path / "list_attr_celeba.txt").write_text(text)
    rows = read_celeba_labels(tmp_path / "list_attr_celeba.txt", ["gender", "age"])
    assert rows == [{"file": "000001.jpg", "gender": 1, "age": 0}, {"file": "000002.jpg", "gender": 0, "age": 1}]
    with pytest.raises(ValueError, match="CelebA has no race labels"):
        read_celeba_labels(tmp_path / "list_attr_celeba.txt", ["gender", "race"])


def test_balanced_accuracy_weights_classes_equally():
    labels = np.array([0, 0, 0, 0, 1, -100])
    metrics = balanced_accuracy(np.array([0, 0, 0, 0, 0, 1]), labels, 2)
    assert metrics["accuracy"] == 0.8 and metrics["balanced_accuracy"] == 0.5 and metrics["count"] == 5


def test_train_on_a_fairface_layout_folder_and_reload(tmp_path):
    write_fairface_folder(tmp_path / "data", n=96)
    tiny_dino_model(image_size=32).save_pretrained(tmp_path / "encoder")
    args = parse_args(
        [
            "--pretrained_model_name_or_path", str(tmp_path / "encoder"),
            "--data", str(tmp_path / "data"),
            "--labels", str(tmp_path / "data" / "labels.csv"),
            "--attributes", "gender,race,age",
            "--output", str(tmp_path / "classifier"),
            "--train_batch_size", "16",
            "--num_train_epochs", "15",
            "--learning_rate", "3e-2",
            "--finetune_backbone",
            "--backbone_learning_rate", "3e-3",
            "--validation_fraction", "0.25",
        ]
    )  # fmt: skip
    metrics = main(args)
    saved = json.loads((tmp_path / "classifier" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    print({a: round(m["balanced_accuracy"], 3) for a, m in metrics["validation"].items()}, metrics["last_loss"])
    assert metrics["num_validation"] == 24 and metrics["last_loss"] < metrics["first_loss"]
    # The drawn attributes are easy: well above chance (0.5 for gender/age, 0.25 for race) on held-out images.
    assert metrics["validation"]["gender"]["balanced_accuracy"] > 0.7
    assert metrics["validation"]["race"]["balanced_accuracy"] > 0.4
    model = AttributeClassifier.from_pretrained(tmp_path / "classifier")
    assert isinstance(model, FaceAttributeClassifier) and model.attributes == ATTRIBUTE_CLASSES
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    logits = model(images)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"gender": (2, 2), "race": (2, 4), "age": (2, 2)}


def test_images_are_read_per_batch_not_all_at_once(tmp_path, monkeypatch):
    from diffusers_fair.classifiers import train

    write_fairface_folder(tmp_path / "data", n=40)
    tiny_dino_model(image_size=32).save_pretrained(tmp_path / "encoder")
    reads = []
    original = train.load_image
    monkeypatch.setattr(train, "load_image", lambda path, resolution: reads.append(path) or original(path, resolution))
    main(parse_args([
        "--pretrained_model_name_or_path", str(tmp_path / "encoder"), "--data", str(tmp_path / "data"),
        "--labels", str(tmp_path / "data" / "labels.csv"), "--output", str(tmp_path / "classifier"),
        "--train_batch_size", "4", "--max_train_steps", "2", "--validation_fraction", "0.1",
    ]))  # fmt: skip
    assert len(reads) == 2 * 4 + 4  # two training batches and the 4 validation images, not the 40 rows up front


def test_bad_arguments():
    base = ["--pretrained_model_name_or_path", "x", "--data", "d", "--labels", "l", "--output_dir", "o"]
    with pytest.raises(ValueError, match="`--attributes` must be a comma-separated subset"):
        parse_args(base + ["--attributes", "gender,hair"])
    with pytest.raises(ValueError, match="`--validation_fraction` must be in"):
        parse_args(base + ["--validation_fraction", "1.5"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the processes of this CPU test would share the GPU")
def test_two_processes_split_each_step_and_match_one_process_with_their_joint_batch(tmp_path):
    write_fairface_folder(tmp_path / "data", n=48)
    tiny_dino_model(image_size=32).save_pretrained(tmp_path / "encoder")
    flags = [
        "--pretrained_model_name_or_path", str(tmp_path / "encoder"),
        "--data", str(tmp_path / "data"),
        "--labels", str(tmp_path / "data" / "labels.csv"),
        "--num_train_epochs", "2",
        "--learning_rate", "3e-2",
        "--finetune_backbone",
        "--backbone_learning_rate", "3e-3",
        "--validation_fraction", "0.25",
    ]  # fmt: skip
    one = main(parse_args(flags + ["--output_dir", str(tmp_path / "one"), "--train_batch_size", "12"]))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    launch += ["diffusers_fair.classifiers.train", *flags, "--output_dir", str(tmp_path / "two")]
    launch += ["--train_batch_size", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Without ACCELERATE_USE_CPU, Accelerate on a machine without GPUs would run each process alone: refused.
    alone = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)
    assert alone.returncode != 0 and "ACCELERATE_USE_CPU=1" in alone.stderr
    run = subprocess.run(launch, capture_output=True, text=True, env={**env, "ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # 36 training images: 3 steps per epoch of 2 x 6 images, as one process's 3 steps of 12.
    assert one["train_steps"] == two["train_steps"] == 6
    weights_one = load_file(tmp_path / "one" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, value in weights_one.items():
        # A key bias adds the same amount to every attention logit of a query: its gradient is zero up to rounding,
        # which AdamW's normalisation turns into steps of either sign. Every other tensor must match.
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-5, msg=name)
