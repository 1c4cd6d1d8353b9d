"""`examples/train_fair_lora.py` end to end on the miniature world (tiny budgets)."""

import importlib.util
import json
import os
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from diffusers_fair.metrics import generate_images, score_images
from diffusers_fair.miniature import WEIGHTS_DIR, load_classifier, load_pipeline
from diffusers_fair.visualization import BAR, TILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("train_fair_lora", os.path.join(ROOT, "examples", "train_fair_lora.py"))
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "eval.txt"
    path.write_text("a photo of the face of a miner, a person\na photo of the face of a midwife, a person\n")
    return str(path)


def tiny_run(output_dir, eval_prompts, *extra):
    return [
        "--output_dir", str(output_dir), "--eval_prompts", eval_prompts, "--images_per_prompt", "4",
        "--num_inference_steps", "3", "--eval_images_per_prompt", "2", "--max_train_steps", "2", "--rank", "2",
        "--num_validation_images", "2", "--train_batch_size", "1", *extra,
    ]  # fmt: skip


def assert_same_classes_as_the_script(adapted, evaluation):
    """`adapted` (stock diffusers) draws, from the script's seeds, images of the classes its evaluation saw."""
    prompts = [row["prompt"] for row in evaluation["after"]["per_prompt"]]
    images = generate_images(adapted, prompts, 2, num_inference_steps=3, guidance_scale=3.0, progress_bar=False,
                             height=32, width=32)  # fmt: skip
    rescored = score_images(images, load_classifier("eval"))
    for row, ours in zip(rescored.per_prompt, evaluation["after"]["per_prompt"]):
        assert row["freq/hair"] == ours["freq/hair"] and row["freq/skin"] == ours["freq/skin"]


@pytest.mark.parametrize("finetune", ["text_encoder_lora", "unet_lora", "text_encoder_and_unet_lora", "prompt_prefix"])
def test_two_steps_per_mode_write_an_adaptor_stock_diffusers_reproduces(finetune, tmp_path, eval_prompts):
    evaluation = train.main(tiny_run(tmp_path, eval_prompts, "--finetune", finetune))
    assert set(evaluation) == {"before", "after", "sampling_floor", "skipped_steps"}
    assert evaluation["skipped_steps"] == []
    assert "bias/hair" in evaluation["after"]["summary"] and "context_kept" in evaluation["after"]["summary"]
    weight_name = "learned_embeds.safetensors" if finetune == "prompt_prefix" else "pytorch_lora_weights.safetensors"
    assert {weight_name, "README.md", "evaluation.json", "evaluation_before.json"} <= set(os.listdir(tmp_path))

    # Stock diffusers with the saved adaptor draws the same images from the same seeds: the same classes as the
    # script's own evaluation of its in-memory model.
    stock = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "pipeline", safety_checker=None)
    stock.scheduler = load_pipeline().scheduler
    stock.set_progress_bar_config(disable=True)
    if finetune == "prompt_prefix":
        stock.load_textual_inversion(tmp_path, weight_name=weight_name)
    else:
        stock.load_lora_weights(tmp_path)

    def adapted(prompt, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        return stock(prompt=[f"<fair> {p}" if finetune == "prompt_prefix" else p for p in prompts], **kwargs)

    assert_same_classes_as_the_script(adapted, evaluation)


def test_frozen_unconditional_trains_and_evaluates_with_the_base_empty_prompt(tmp_path, eval_prompts):
    evaluation = train.main(tiny_run(tmp_path, eval_prompts, "--frozen_unconditional"))
    # The script's evaluation is what stock diffusers draws with the adaptor loaded and the base encoder's empty-prompt
    # embedding as `negative_prompt_embeds` (the documented way to use such an adaptor).
    base = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "pipeline", safety_checker=None)
    negative = base.encode_prompt("", "cpu", 1, False)[0]
    stock = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "pipeline", safety_checker=None)
    stock.scheduler = load_pipeline().scheduler
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(tmp_path)
    assert not torch.equal(stock.encode_prompt("", "cpu", 1, False)[0], negative)  # the adaptor moves the empty prompt

    def adapted(prompt, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        return stock(prompt=prompts, negative_prompt_embeds=negative.repeat(len(prompts), 1, 1), **kwargs)

    assert_same_classes_as_the_script(adapted, evaluation)

    # The card says so, and its loading code runs and draws the same images as the documented way above.
    card = ModelCard.load(tmp_path / "README.md")
    assert "| frozen_unconditional | `True` |" in card.text
    usage = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "negative_prompt_embeds=negative_prompt_embeds" in usage
    scope = {}
    exec(usage, scope)  # the card's own code, written by this run
    prompt = "a photo of the face of a doctor, a person"
    expected = adapted(prompt, generator=torch.Generator().manual_seed(0), output_type="np").images
    drawn = scope["pipe"](prompt, negative_prompt_embeds=scope["negative_prompt_embeds"], output_type="np",
                          generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert np.array_equal(drawn, expected)


@pytest.mark.parametrize("flags, scaling", [([], "paper"), (["--gradient_scaling", "exact"], "exact")])
def test_gradient_scaling_sets_the_step_weights_of_the_biased_gradient(flags, scaling, tmp_path, eval_prompts,
                                                                         monkeypatch):  # fmt: skip
    pipes = []
    monkeypatch.setattr(train, "load_pipeline", lambda args: pipes.append(load_pipeline()) or pipes[-1])
    train.main(tiny_run(tmp_path, eval_prompts, *flags))
    scheduler = pipes[0].scheduler  # the pipeline samples with this one
    assert scheduler.config.gradient_scaling == scaling
    reference = load_pipeline().scheduler  # shipped with "paper"
    reference.set_timesteps(3)
    product = scheduler.noise_prediction_coefficients * scheduler.gradient_scales
    assert torch.equal(scheduler.timesteps, reference.timesteps)
    assert torch.allclose(product, product[0]) == (scaling == "exact")
    assert torch.equal(scheduler.gradient_scales, reference.gradient_scales) == (scaling == "paper")
    assert f"| gradient_scaling | `{scaling}` |" in (tmp_path / "README.md").read_text()


def test_intermediate_validation_logs_its_metrics_and_writes_a_grid(tmp_path, eval_prompts, caplog):
    caplog.set_level("INFO")
    evaluation = train.main(tiny_run(tmp_path, eval_prompts, "--validation_steps", "1"))
    assert os.path.isfile(tmp_path / "validation" / "step-000001.png")
    lines = [r.getMessage() for r in caplog.records if "Step 1: " in r.getMessage()]
    assert len(lines) == 1 and "bias/hair" in lines[0] and "context_kept" in lines[0]
    # The step-2 evaluation is the final one, so it is not logged as a validation step.
    assert not any("Step 2: " in r.getMessage() for r in caplog.records)
    assert "bias/hair" in evaluation["after"]["summary"]


@pytest.fixture(scope="module")
def selection_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "selection.txt"
    path.write_text("a portrait of a doctor\na portrait of a nurse\n")
    return str(path)


def test_selection_keeps_the_lowest_bias_step(tmp_path, eval_prompts, selection_prompts, monkeypatch):
    selecting = ["--validation_steps", "1", "--selection_prompts", selection_prompts, "--selection_images_per_prompt"]
    evaluation = train.main(tiny_run(tmp_path / "measured", eval_prompts, "--max_train_steps", "3", *selecting, "2"))
    history = evaluation["selection"]["history"]
    assert [step for step, *_ in history] == [1, 2, 3]
    # Two images per prompt: the `hair` bias of each prompt is 0 or 1, so every score is a multiple of 1/2.
    assert all(score * 2 == round(score * 2) for _, score, _ in history)
    # The miniature world's similarity floor (0.85, CLIP + DINO): the lowest score among the steps that reach it.
    assert evaluation["selection"]["min_similarity"] == 0.85
    assert all(0.5 < similarity <= 1 + 1e-6 for *_, similarity in history)  # cosines, up to float rounding
    eligible = [entry for entry in history if entry[2] >= 0.85]
    expected = min(eligible, key=lambda e: e[1]) if eligible else max(history, key=lambda e: e[2])
    assert evaluation["selection"]["selected_step"] == expected[0]

    # With scripted scores and similarities that select step 2 of 4 (step 4 scores lower but lost its meaning), the
    # run saves what a 2-step run saves.
    scores = iter([(0.4, 0.9), (0.1, 0.9), (0.3, 0.9), (0.05, 0.5)])
    original = train.evaluate

    def scripted(*args, num_images_per_prompt=None, **kwargs):
        result = original(*args, num_images_per_prompt=num_images_per_prompt, **kwargs)
        if num_images_per_prompt is not None:  # the selection's measurement
            score, similarity = next(scores)
            result["summary"]["bias/hair"] = [score, 0.0]
            result["summary"].update({k: [similarity, 0.0] for k in result["summary"] if k.endswith("_similarity")})
        return result

    monkeypatch.setattr(train, "evaluate", scripted)
    evaluation = train.main(tiny_run(tmp_path / "selected", eval_prompts, "--max_train_steps", "4", *selecting, "2"))
    monkeypatch.undo()
    assert evaluation["selection"]["selected_step"] == 2
    train.main(tiny_run(tmp_path / "two", eval_prompts))
    a = load_file(tmp_path / "selected" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert evaluation["after"] == json.loads((tmp_path / "two" / "evaluation.json").read_text())["after"]
    card = (tmp_path / "selected" / "README.md").read_text()
    assert "selected_step" in card and selection_prompts in card and "| selection_min_similarity | `0.85` |" in card


@pytest.mark.parametrize("selecting", [False, True])
def test_resume_continues_exactly(selecting, tmp_path, eval_prompts, selection_prompts, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    schedule = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    if selecting:  # the selection's history and kept state go through the checkpoint too
        schedule += ["--validation_steps", "1", "--selection_prompts", selection_prompts]
        schedule += ["--selection_images_per_prompt", "2"]
    train.main(tiny_run(whole, eval_prompts, *schedule))

    original = train.save_checkpoint

    def crash_after_first_checkpoint(accelerator, run_args, step):
        original(accelerator, run_args, step)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_run(resumed, eval_prompts, *schedule))
    assert os.path.isdir(resumed / "checkpoint-2") and not os.path.exists(resumed / "pytorch_lora_weights.safetensors")
    monkeypatch.setattr(train, "save_checkpoint", original)
    # What a kill during the next save leaves, and a folder of the user's: `latest` is still checkpoint-2.
    (resumed / "checkpoint-4.partial").mkdir()
    (resumed / "checkpoint-4.partial" / "adapter_state.safetensors").write_bytes(b"")
    (resumed / "checkpoint-best").mkdir()
    train.main(tiny_run(resumed, eval_prompts, *schedule, "--resume_from_checkpoint", "latest"))
    a = load_file(whole / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if selecting:
        a, b = (json.loads((run / "evaluation.json").read_text())["selection"] for run in (whole, resumed))
        assert a == b and len(a["history"]) == 4


def test_resume_at_or_past_the_last_step(tmp_path, eval_prompts, selection_prompts):
    selecting = ["--validation_steps", "1", "--selection_prompts", selection_prompts, "--selection_images_per_prompt"]
    run = tiny_run(tmp_path / "run", eval_prompts, "--max_train_steps", "3", "--checkpointing_steps", "1", *selecting)
    history = train.main(run + ["2"])["selection"]["history"]
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    # A checkpoint already at --max_train_steps ends there: its measured steps are not measured again.
    resumed = tiny_run(tmp_path / "resumed", eval_prompts, "--max_train_steps", "2", *selecting, "2")
    selection = train.main(resumed + ["--resume_from_checkpoint", checkpoint])["selection"]
    assert selection["history"] == history[:2]
    with pytest.raises(ValueError, match=r"at step 2, past `--max_train_steps` 1; raise `--max_train_steps`"):
        train.main(tiny_run(tmp_path / "past", eval_prompts, "--max_train_steps", "1", "--resume_from_checkpoint",
                            checkpoint))  # fmt: skip


def test_model_card_and_push_to_hub(tmp_path, eval_prompts, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "org/fair-miniature"

    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)) and Repo()
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    token = "hf_secret_token_123"
    # No --hub_model_id: the repo is named after the output folder, given with a trailing slash as shells complete it.
    train.main(tiny_run(str(tmp_path) + os.sep, eval_prompts, "--push_to_hub", "--hub_token", token,
                        "--checkpointing_steps", "1"))  # fmt: skip
    assert calls["create"][0] == tmp_path.name and calls["create"][1]["token"] == token
    upload = calls["upload"]
    assert upload["repo_id"] == "org/fair-miniature" and os.path.samefile(upload["folder_path"], tmp_path)
    assert "checkpoint-*" in upload["ignore_patterns"]
    for root, _, names in os.walk(tmp_path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert token.encode() not in f.read(), f"token leaked into {name}"
    card = ModelCard.load(tmp_path / "README.md")
    assert 'pipe.load_lora_weights("org/fair-miniature")' in card.text  # the Hub's repo id, not the local folder
    assert card.data.library_name == "diffusers" and "fairness" in card.data.tags
    assert card.data.base_model == "miniature"
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    before, after = evaluation["before"]["summary"]["bias/hair"], evaluation["after"]["summary"]["bias/hair"]
    assert f"{before[0]:.3f} ± {before[1]:.3f}" in card.text
    assert f"torch {torch.__version__}, diffusers {diffusers.__version__}" in card.text
    # 2 evaluation images per prompt: a balanced model measures E|2 k / 2 - 1| = 1/2 for k ~ Binomial(2, 1/2)
    assert evaluation["sampling_floor"]["bias/hair"] == pytest.approx(0.5)
    assert "| sampling floor |" in card.text and f"| {after[0]:.3f} ± {after[1]:.3f} | 0.500 |" in card.text
    # The validation grid: per eval prompt (2), a base row and an adapted row of 2 images with 3 attribute bars.
    assert "(validation_grid.png)" in card.text
    with Image.open(tmp_path / "validation_grid.png") as grid:
        tile_height = TILE + 3 * BAR + 2
        assert grid.size == (2 * TILE + 4, 4 * tile_height + 3 * 6)
    assert os.path.isfile(tmp_path / "validation" / "step-000002.png")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target", "hair=short:0.5,curly:0.5"], "curly"),
        (["--target", "gender=uniform"], "gender"),
        (
            ["--pretrained_model_name_or_path", "/nonexistent/model", "--classifier", "miniature-train"]
            + ["--target", "hair=uniform", "--train_prompts", "miniature-train", "--semantics_encoders"],
            "pretrained_model_name_or_path",
        ),
        (["--pretrained_model_name_or_path", "org/sd", "--target", "hair=uniform"], "--classifier"),
        (["--report_to", "wandb", "--hub_token", "x"], "hub_token"),
        (["--max_train_steps", "0"], "max_train_steps"),
        (["--num_validation_images", "0"], "num_validation_images"),
        (["--validation_steps", "0"], "validation_steps"),
        (["--train_batch_size", "0"], "train_batch_size"),
        (["--images_per_prompt", "0"], "`--images_per_prompt` must be positive"),
        (["--eval_images_per_prompt", "0"], "`--eval_images_per_prompt` must be positive"),
        (["--eval_classifier", "miniature-context"], "--eval_classifier.*cannot measure the target.*'hair'"),
        (["--selection_images_per_prompt", "0"], "`--selection_images_per_prompt` must be positive"),
        (["--selection_min_similarity", "1.5"], r"`--selection_min_similarity` is a cosine similarity in \[-1, 1\]"),
        (["--selection_min_similarity", "0.9", "--semantics_encoders"], "`--semantics_encoders`, which is empty"),
        (["--gradient", "naive", "--gradient_scaling", "exact"], "`--gradient_scaling` weights the steps of the"),
        (["--selection_prompts", "miniature-heldout"], "`--selection_prompts`.*shares 2 prompts with `--eval_"),
        (["--gradient_accumulation_steps", "0"], "`--gradient_accumulation_steps` must be positive"),
        (["--checkpoints_total_limit", "0"], "`--checkpoints_total_limit` must be positive"),
        (["--num_inference_steps", "0"], "`--num_inference_steps` must be positive"),
        (["--num_inference_steps_jitter", "3"], r"`--num_inference_steps_jitter`.*\[0, T - 1\].*got 3"),
        (["--num_inference_steps_jitter", "-1"], r"`--num_inference_steps_jitter`.*got -1"),
        (["--target", "hair=uniform", "--target_config", "TARGET_FILE"], "Pass the target once"),
        (["--resume_from_checkpoint", "OUTPUT"], r"`--resume_from_checkpoint`.*not a checkpoint folder written by"),
        (["--gradient", "naive", "--backprop_steps", "2"], "`--backprop_steps` samples the steps of the biased"),
        (["--backprop_steps", "4"], r"`--backprop_steps` must be in \[1, 3\]"),  # tiny_run samples 3 steps
        (["--resolution", "30"], "`--resolution` must be a positive multiple of 8"),
        (["--learning_rate", "0"], "`--learning_rate` must be positive"),
        (["--max_grad_norm", "-1"], "`--max_grad_norm` must be positive"),
        (["--lr_warmup_steps", "-5"], "`--lr_warmup_steps` must be zero or positive"),
        (["--rank", "0"], "`--rank` must be positive"),
        (["--num_prefix_tokens", "0"], "`--num_prefix_tokens` must be positive"),
        (["--report_to", "all", "--hub_token", "x"], "hub_token"),
        (["--variant", "fp16"], "`--revision` and `--variant` choose files of a Hub repo"),
    ],
)
def test_bad_flags_give_clear_errors(flags, message, tmp_path, eval_prompts):
    (tmp_path / "target.yaml").write_text("hair: uniform\n")
    flags = [str(tmp_path / "target.yaml") if f == "TARGET_FILE" else str(tmp_path) if f == "OUTPUT" else f
             for f in flags]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train.main(tiny_run(tmp_path, eval_prompts) + flags)


def test_target_config_is_read_with_the_classifier_classes(tmp_path):
    (tmp_path / "target.yaml").write_text("hair: uniform\n")
    args = train.parse_args(["--target_config", str(tmp_path / "target.yaml")])
    assert args.target is None  # the miniature world's default target gives way to the file
    target = train.load_target(args, load_classifier("train").attributes)
    assert target.to_string() == "hair=short:0.5,long:0.5"


def test_config_file_keys_are_checked_as_flags_and_the_command_line_wins(tmp_path, eval_prompts, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        "semantics_encoders: miniature-clip\nvalidation_prompts: a doctor\nlearning_rate: 0.01\n"
        "gradient_checkpointing: true\nrevision: null\n"
    )
    args = train.parse_args(tiny_run(tmp_path, eval_prompts, "--config", str(config), "--learning_rate", "0.02"))
    assert args.semantics_encoders == ["miniature-clip"] and args.validation_prompts == ["a doctor"]
    assert args.learning_rate == 0.02 and args.gradient_checkpointing and args.revision is None
    config.write_text("finetune: bogus\n")
    with pytest.raises(SystemExit):
        train.parse_args(tiny_run(tmp_path, eval_prompts, "--config", str(config)))
    assert "argument --finetune: invalid choice: 'bogus'" in capsys.readouterr().err
    for text, message in [
        ("gradient_checkpointing: 'yes'\n", "`gradient_checkpointing` is a switch"),
        ("learning_rate: [0.1, 0.2]\n", "`learning_rate` takes one value"),
        ("mixed_precision: no\n", r"`mixed_precision` is not a switch but got the boolean False; quote the value"),
        ("learnig_rate: 0.1\n", r"unknown keys \['learnig_rate'\]"),
        ("- learning_rate\n", "must hold a mapping"),
    ]:
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            train.parse_args(tiny_run(tmp_path, eval_prompts, "--config", str(config)))


def test_the_miniature_similarity_floor_needs_its_encoders(tmp_path, eval_prompts):
    assert train.parse_args(tiny_run(tmp_path, eval_prompts)).selection_min_similarity == 0.85
    # Without semantics encoders there is nothing to measure similarity with: the default floor does not apply (an
    # explicit one is refused, see the bad flags above), and the selection keeps the lowest bias.
    assert train.parse_args(tiny_run(tmp_path, eval_prompts, "--semantics_encoders")).selection_min_similarity is None
    generic = ["--pretrained_model_name_or_path", "org/sd", "--classifier", "x", "--target", "a=uniform"]
    generic += ["--train_prompts", eval_prompts]
    assert train.parse_args(tiny_run(tmp_path, eval_prompts, *generic)).selection_min_similarity is None


def test_unknown_flag_is_refused(tmp_path, eval_prompts, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(tiny_run(tmp_path, eval_prompts, "--output_type", "pil"))
    assert "--output_type" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the processes of this CPU test would share the GPU")
def test_two_processes_train_on_the_same_prompts_with_their_own_noise(tmp_path, eval_prompts):
    # The transport gathers the class probabilities of all processes: they must come from one prompt's images.
    script = os.path.join(ROOT, "tests", "scripts", "train_example_two_processes.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, str(tmp_path)]
    command += tiny_run(tmp_path, eval_prompts, "--train_batch_size", "2", "--lr_scheduler", "linear")
    command += ["--checkpointing_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Without ACCELERATE_USE_CPU, Accelerate on a machine without GPUs would run each process alone: refused.
    alone = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert alone.returncode != 0 and "ACCELERATE_USE_CPU=1" in alone.stderr
    assert not os.path.exists(tmp_path / "evaluation_before.json")
    run = subprocess.run(command, capture_output=True, text=True, env={**env, "ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"process-{rank}.json").read_text()) for rank in (0, 1))
    assert len(first["calls"]) == len(second["calls"]) == 4  # 2 steps x 2 prompts
    assert [c["prompt"] for c in first["calls"]] == [c["prompt"] for c in second["calls"]]
    assert len({c["prompt"][0] for c in first["calls"]}) > 1
    assert all(a["noise_seed"] != b["noise_seed"] for a, b in zip(first["calls"], second["calls"]))
    # Each process evaluates its share of the eval prompts (the main one also draws the grid, of all of them); the
    # gathered rows are in prompt order and equal a single-process evaluation's (here: the base model's, before).
    prompts = [line for line in open(eval_prompts, encoding="utf-8").read().splitlines() if line]
    assert second["evaluated_prompts"] == [prompts[1]] and prompts[0] in first["evaluated_prompts"]
    before = json.loads((tmp_path / "evaluation_before.json").read_text())
    assert [row["prompt"] for row in before["per_prompt"]] == prompts
    base = generate_images(load_pipeline(), prompts, 2, num_inference_steps=3, guidance_scale=3.0, progress_bar=False,
                           height=32, width=32)  # fmt: skip
    for row, ours in zip(score_images(base, load_classifier("eval")).per_prompt, before["per_prompt"]):
        assert row["freq/hair"] == ours["freq/hair"] and row["freq/skin"] == ours["freq/skin"]
    assert set(json.loads((tmp_path / "evaluation.json").read_text())["after"]["summary"]) >= {
        "bias/hair",
        "context_kept",
    }
    # Accelerate steps the scheduler once per process: the linear decay still spans the run's 2 steps.
    assert first["learning_rates"] == pytest.approx([0.5 * 7e-3, 0.0])
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    # The step-1 checkpoint: one adaptor state (the processes hold the same weights) and each process's RNG state.
    checkpoint = tmp_path / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.iterdir() if "random_states" in p.name) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    state = load_file(checkpoint / "adapter_state.safetensors")
    assert len(state) == len(load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    assert all(value.isfinite().all() for value in state.values())
    # Resumed where only the main process sees the saved evaluation (nodes without a shared output folder): the
    # processes follow the main one's decision, reuse its evaluation and finish (their collectives used to mismatch,
    # and the run crashed).
    hidden = {**env, "ACCELERATE_USE_CPU": "1", "HIDE_SAVED_EVALUATION": "1"}
    resumed = subprocess.run(command + ["--resume_from_checkpoint", "latest"], capture_output=True, text=True,
                             env=hidden, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "evaluation.json").read_text())["before"] == before


def test_a_step_whose_gradient_is_not_finite_is_skipped_and_reported(tmp_path, eval_prompts, monkeypatch, caplog):
    original = train.FairFinetuningObjective.forward
    calls = []

    def nan_on_the_first_call(self, *args, **kwargs):
        loss, logs = original(self, *args, **kwargs)
        calls.append(loss)
        return (loss * float("nan") if len(calls) == 1 else loss), logs

    monkeypatch.setattr(train.FairFinetuningObjective, "forward", nan_on_the_first_call)
    caplog.set_level("WARNING")
    evaluation = train.main(tiny_run(tmp_path, eval_prompts))  # two steps of one prompt
    assert len(calls) == 2 and evaluation["skipped_steps"] == [1]
    assert "| skipped_steps (gradient not finite) | `[1]` |" in (tmp_path / "README.md").read_text()
    warnings = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0].endswith("Step 1: the gradient is not finite; the update is skipped.")
    assert warnings[1].endswith("1 of 2 steps were skipped (gradient not finite): steps [1]. They are listed in "
                                "evaluation.json and the model card.")  # fmt: skip
    weights = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(w.isfinite().all() for w in weights.values())
    assert all(w.abs().sum() > 0 for k, w in weights.items() if k.endswith("up.weight"))  # step 2 trained


def test_model_card_refuses_credentials_but_lists_prefix_tokens():
    from diffusers_fair.model_card import make_model_card

    common = {"base_model": "miniature", "target": "hair=uniform", "classifier": "miniature-train",
              "attributes": ["hair"], "metrics_before": {}, "metrics_after": {}, "usage": ""}  # fmt: skip
    assert "| num_prefix_tokens | `5` |" in make_model_card(settings={"num_prefix_tokens": 5}, **common).text
    for key in ("hub_token", "token", "api_key"):
        with pytest.raises(ValueError, match=f"credentials, got \\['{key}'\\]"):
            make_model_card(settings={key: "x"}, **common)
