#!/usr/bin/env python
"""Fair finetuning of a Stable Diffusion pipeline (Shen et al., ICLR 2024) with Accelerate.

    accelerate launch examples/train_fair_lora.py --pretrained_model_name_or_path miniature --output_dir out
    python examples/train_fair_lora.py --config my_run.yaml

With `--pretrained_model_name_or_path miniature` every other flag defaults to the miniature world shipped with the
package (its classifiers, CLIP and DINO, a uniform `hair` target, its train / held-out occupations) and a demo budget.
"""

import argparse
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from diffusers_fair import (
    BiasedGradientScheduler,
    DistributionalAlignmentLoss,
    FairStableDiffusionPipeline,
    ImageSemanticsLoss,
    TargetDistribution,
)
from diffusers_fair.audit.core import load_classifier as load_any_classifier
from diffusers_fair.audit.core import load_clip, load_dino, looks_like_path, versions
from diffusers_fair.faces import load_detector
from diffusers_fair.metrics import sampling_floor
from diffusers_fair.model_card import make_model_card
from diffusers_fair.prompts import load_prompts
from diffusers_fair.scheduling_biased_gradient import GRADIENT_SCALINGS
from diffusers_fair.training import (
    FINETUNE_MODES,
    CheckpointSelection,
    FairFinetuningObjective,
    add_fair_adapters,
    evaluate_adapters,
    frozen_unconditional_embeds,
    summarize_per_prompt,
    validation_grid,
)
from diffusers_fair.utils import atomic_write, atomic_write_json, check_processes_joined

logger = get_logger(__name__)

MINIATURE = "miniature"
MINIATURE_DEFAULTS = {  # the demo: 5-9 minutes on 2 CPU cores (budget: 10)
    "classifier": "miniature-train",
    "eval_classifier": "miniature-eval",
    "context_classifier": "miniature-context",
    "semantics_encoders": ["miniature"],
    "target": "hair=uniform",
    # Both LoRAs: the paper's lowest-bias row (Table 3). On this world the text encoder alone moves held-out
    # occupations less (model_cards/README.md).
    "finetune": "text_encoder_and_unet_lora",
    "train_prompts": "miniature-train",
    "eval_prompts": "miniature-heldout",
    "resolution": 32,
    "guidance_scale": 3.0,
    "num_inference_steps": 8,
    # The paper's 1 / A_t; "exact" (equal weights) measured the same within the seeds' spread (model_cards/README.md).
    "gradient_scaling": "paper",
    "train_batch_size": 4,  # four prompts per step: their opposite corrections share each update
    "images_per_prompt": 12,
    "eval_images_per_prompt": 64,  # the sampling floor of a balanced `hair`: 0.099 (0.140 at 32)
    "max_train_steps": 40,
    "learning_rate": 7e-3,
    "rank": 8,
    "confidence_threshold": 0.6,
    "lambda_img_agree": 8.0,
    "lambda_img_nonface": 4.0,  # no face boxes here: a changing image's whole frame gets this weight
    "lambda_img_face": 0.32,
    # With --selection_prompts: steps whose images lost their meaning are not kept (model_cards/README.md).
    "selection_min_similarity": 0.85,
}
GENERIC_DEFAULTS = {
    "finetune": "text_encoder_lora",
    "semantics_encoders": ["laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "facebook/dinov2-base"],
    "resolution": 512,
    "guidance_scale": 7.5,
    "num_inference_steps": 20,
    "gradient_scaling": "paper",
    "train_batch_size": 1,
    "images_per_prompt": 24,
    "eval_images_per_prompt": 60,
    "max_train_steps": 10000,
    "learning_rate": 5e-5,
    "rank": 50,
    "confidence_threshold": 0.8,
    "lambda_img_agree": 8.0,
    "lambda_img_nonface": 1.6,
    "lambda_img_face": 0.32,
}


def config_to_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The `--config` file's keys as command-line flags (`key: null` keeps the flag's default)."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise ValueError(f"`--config` {path!r} must hold a mapping of flag names to values, got a {kind}.")
    actions = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "config"}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise ValueError(f"`--config` {path!r} has unknown keys {unknown}; use the flags' names.")
    argv = []
    for key, value in config.items():
        action, flag = actions[key], actions[key].option_strings[0]
        if value is None:
            continue
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise ValueError(f"`--config` {path!r}: `{key}` is a switch; give true or false, got {value!r}.")
            argv += [flag] if value else []
        elif action.nargs in ("*", "+"):
            argv += [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
        elif isinstance(value, (list, dict)):
            raise ValueError(f"`--config` {path!r}: `{key}` takes one value, got {value!r}.")
        elif isinstance(value, bool):  # YAML reads an unquoted no / yes / on / off as a boolean
            raise ValueError(
                f"`--config` {path!r}: `{key}` is not a switch but got the boolean {value}; quote the value "
                f'(e.g. `{key}: "no"`).'
            )
        else:
            argv.append(f"{flag}={value}")
    return argv


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML or JSON file whose keys are these flags' names.")
    add = parser.add_argument
    # diffusers' usual flags
    add("--pretrained_model_name_or_path", default=MINIATURE, help="A Hub id, a folder, or 'miniature'.")
    add("--revision", default=None)
    add("--variant", default=None)
    add("--output_dir", default="fair-lora")
    add("--seed", type=int, default=0)
    add("--resolution", type=int, default=None, help="Image side in pixels.")
    add("--train_batch_size", type=int, default=None, help="Prompts per step and process (1; miniature: 4).")
    add("--max_train_steps", type=int, default=None)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--learning_rate", type=float, default=None)
    add("--lr_scheduler", default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--max_grad_norm", type=float, default=1.0)
    add("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    add("--report_to", default=None, help="An Accelerate tracker ('tensorboard', 'wandb'); none by default.")
    add("--checkpointing_steps", type=int, default=200)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    add("--rank", type=int, default=None, help="LoRA rank.")
    add("--validation_prompts", nargs="+", default=None, help="Prompts of the validation grid (default: 3 eval ones).")
    add("--num_validation_images", type=int, default=8, help="Images per prompt (columns) of the validation grid.")
    add("--validation_steps", type=int, default=None, help="Evaluate every this many steps (and at the end).")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", default=None)
    add("--hub_token", default=None)
    # the method's flags
    add("--target", default=None, help="A TargetDistribution string, e.g. 'gender=uniform;age=young:0.75,old:0.25'.")
    add("--target_config", default=None, help="A YAML/JSON file with the target distribution.")
    add("--classifier", default=None, help="Folder or Hub id of an AttributeClassifier, or 'clip-zero-shot'.")
    add("--eval_classifier", default=None, help="An independent classifier for evaluation (default: --classifier).")
    add("--context_classifier", default=None, help="A classifier whose agreement with the originals is reported.")
    add(
        "--clip_zero_shot_model", default="openai/clip-vit-large-patch14", help="CLIP for --classifier clip-zero-shot."
    )
    add("--train_prompts", default=None, help="A text file (one prompt per line) or a shipped prompt set.")
    add("--eval_prompts", default=None, help="A text file or a shipped prompt set (prompts never trained on).")
    add(
        "--selection_prompts",
        default=None,
        help="Validation prompts (a text file or a shipped set, e.g. occupations-validation) on which to pick the "
        "best adaptor: at every validation and at the end, the mean bias of the target's attributes on them "
        "(measured with --classifier) is recorded, and the run keeps the lowest one's adaptor, as the paper reports "
        "its best checkpoint. Never the eval prompts. By default the last step's adaptor is kept.",
    )
    add("--selection_images_per_prompt", type=int, default=16, help="Images per selection prompt.")
    add(
        "--selection_min_similarity",
        type=float,
        default=None,
        help="With --selection_prompts, keep only steps whose selection images have at least this mean similarity "
        "(cosine, averaged over --semantics_encoders) to the base model's images from the same noise; if none "
        "does, the most similar step is kept. Off by default; 0.85 on the miniature world when its semantics "
        "encoders are on.",
    )
    add(
        "--finetune",
        default=None,
        choices=FINETUNE_MODES,
        help="What to train; defaults to text_encoder_lora (the paper's recommendation), on the miniature world to "
        "text_encoder_and_unet_lora (see model_cards/README.md).",
    )
    add("--num_prefix_tokens", type=int, default=5)
    add("--gradient", default="biased", choices=["biased", "naive"])
    add("--backprop_steps", type=int, default=None)
    add(
        "--gradient_scaling",
        default=None,
        choices=GRADIENT_SCALINGS,
        help="How the biased gradient weights the sampling steps (BiasedGradientScheduler): 'paper' (1 / A_t, "
        "Algorithm 1; the default), 'exact' (every step's noise prediction reaches the image with the same weight) or "
        "'none'.",
    )
    add("--num_inference_steps", type=int, default=None)
    add("--num_inference_steps_jitter", type=int, default=0, help="Draw steps in [T - j, T + j] (paper: 19-23).")
    add("--guidance_scale", type=float, default=None)
    add("--confidence_threshold", type=float, default=None, help="C of the DAL (paper: 0.6-0.8).")
    add("--lambda_img_agree", type=float, default=None)
    add("--lambda_img_face", type=float, default=None)
    add("--lambda_img_nonface", type=float, default=None)
    add("--lambda_face", type=float, default=0.0, help="Face-realism loss weight (library API only, see --help).")
    add("--face_detector", default=None, help="Face-centric mode: a detector of diffusers_fair.faces.load_detector.")
    add("--face_crop_size", type=int, default=224, help="Side of the face crops the classifier sees.")
    add(
        "--semantics_encoders",
        nargs="*",
        default=None,
        help="CLIP / DINOv2 ids or folders ('miniature': its CLIP and DINO; 'miniature-clip', 'miniature-dino'); "
        "none disables it.",
    )
    add("--images_per_prompt", type=int, default=None, help="N, the DAL's batch, per process.")
    add("--eval_images_per_prompt", type=int, default=None)
    add(
        "--frozen_unconditional",
        action="store_true",
        help="Keep guidance's empty-prompt embedding from the frozen text encoder while training. Stock diffusers "
        "runs the empty prompt through the adapted encoder, so the adaptor must then be used with "
        "`negative_prompt_embeds` from the base encoder.",
    )

    argv = sys.argv[1:] if input_args is None else list(input_args)
    config_args, _ = parser.parse_known_args(argv)
    if config_args.config:
        # The file's keys become flags before the command line's, so argparse checks them (types, choices, lists)
        # and a flag on the command line wins.
        argv = config_to_argv(parser, config_args.config) + argv
    args = parser.parse_args(argv)
    if args.target is not None and args.target_config is not None:
        raise ValueError("Pass the target once: `--target` or `--target_config`, not both.")
    if args.gradient == "naive" and args.gradient_scaling is not None:
        raise ValueError(
            "`--gradient_scaling` weights the steps of the biased gradient; `--gradient naive` is exact and has no "
            "step weights. Drop one of the two flags."
        )
    if args.pretrained_model_name_or_path == MINIATURE and (args.revision or args.variant):
        raise ValueError(
            "`--revision` and `--variant` choose files of a Hub repo or folder; the miniature world is shipped in the "
            "package. Drop them or give `--pretrained_model_name_or_path`."
        )
    similarity_floor_given = args.selection_min_similarity is not None
    defaults = MINIATURE_DEFAULTS if args.pretrained_model_name_or_path == MINIATURE else GENERIC_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None and not (key == "target" and args.target_config is not None):
            setattr(args, key, value)
    if args.selection_min_similarity is not None and not args.semantics_encoders:
        if similarity_floor_given:
            raise ValueError(
                "`--selection_min_similarity` measures similarity with `--semantics_encoders`, which is empty; "
                "pass encoders (e.g. CLIP / DINOv2 ids) or drop `--selection_min_similarity`."
            )
        args.selection_min_similarity = None  # the miniature default applies only with its encoders
    if args.selection_min_similarity is not None and not -1 <= args.selection_min_similarity <= 1:
        raise ValueError(
            f"`--selection_min_similarity` is a cosine similarity in [-1, 1], got {args.selection_min_similarity}."
        )
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(
            f"`--checkpoints_total_limit` must be positive (or left out to keep every checkpoint), got "
            f"{args.checkpoints_total_limit}."
        )
    if args.max_train_steps < 1:
        raise ValueError(f"`--max_train_steps` must be positive, got {args.max_train_steps}.")
    if args.num_inference_steps < 1:
        raise ValueError(f"`--num_inference_steps` must be positive, got {args.num_inference_steps}.")
    if not 0 <= args.num_inference_steps_jitter < args.num_inference_steps:
        raise ValueError(
            f"`--num_inference_steps_jitter` draws steps in [T - j, T + j] and must be in [0, T - 1] for T = "
            f"`--num_inference_steps` {args.num_inference_steps}, got {args.num_inference_steps_jitter}."
        )
    if args.backprop_steps is not None:
        if args.gradient != "biased":
            raise ValueError(
                "`--backprop_steps` samples the steps of the biased gradient; `--gradient naive` backpropagates "
                "through every step. Drop one of the two flags."
            )
        fewest = args.num_inference_steps - args.num_inference_steps_jitter
        if not 1 <= args.backprop_steps <= fewest:
            raise ValueError(
                f"`--backprop_steps` must be in [1, {fewest}] (the fewest sampling steps a training step draws), got "
                f"{args.backprop_steps}."
            )
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise ValueError(f"`--resolution` must be a positive multiple of 8 (the VAE's factor), got {args.resolution}.")
    for name, value in (("learning_rate", args.learning_rate), ("max_grad_norm", args.max_grad_norm)):
        if not value > 0:
            raise ValueError(f"`--{name}` must be positive, got {value}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"`--lr_warmup_steps` must be zero or positive, got {args.lr_warmup_steps}.")
    if args.validation_steps is None:
        args.validation_steps = args.max_train_steps
    for name in (
        "gradient_accumulation_steps",
        "rank",
        "num_prefix_tokens",
        "validation_steps",
        "num_validation_images",
        "checkpointing_steps",
        "train_batch_size",
        "images_per_prompt",
        "eval_images_per_prompt",
        "selection_images_per_prompt",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be positive, got {getattr(args, name)}.")
    if args.classifier is None:
        raise ValueError(
            "`--classifier` is required: a folder or Hub id of an AttributeClassifier, or 'clip-zero-shot'."
        )
    if args.target is None and args.target_config is None:
        raise ValueError("Pass `--target` (e.g. 'gender=uniform') or `--target_config FILE`.")
    if args.train_prompts is None or args.eval_prompts is None:
        raise ValueError("Pass `--train_prompts` and `--eval_prompts` (a text file or a shipped prompt set).")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ValueError(
            "You cannot use both `--report_to=wandb` and `--hub_token`: the token would be logged to wandb. "
            "Log in with `hf auth login` instead."
        )
    if args.lambda_face > 0:
        raise ValueError(
            "`--lambda_face` needs a face embedder and a face bank, which have no standard file format to name here; "
            "build them with `diffusers_fair.faces` and pass `FaceRealismLoss` to `FairFinetuningObjective`, or use 0."
        )
    return args


def load_pipeline(args):
    if args.pretrained_model_name_or_path == MINIATURE:
        from diffusers_fair.miniature import load_pipeline as load_miniature

        return load_miniature()
    path = args.pretrained_model_name_or_path
    if (os.path.exists(path) or looks_like_path(path)) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(
            f"`--pretrained_model_name_or_path` {path!r} is not a diffusers pipeline folder (no model_index.json); "
            "give a folder written by `save_pretrained`, a Hub id, or 'miniature'."
        )
    return FairStableDiffusionPipeline.from_pretrained(
        path, revision=args.revision, variant=args.variant, safety_checker=None, requires_safety_checker=False
    )


def load_classifier(name: str, args):
    if name == "clip-zero-shot":
        from transformers import CLIPModel, CLIPTokenizer

        from diffusers_fair import CLIPZeroShotClassifier

        clip = CLIPModel.from_pretrained(args.clip_zero_shot_model)
        tokenizer = CLIPTokenizer.from_pretrained(args.clip_zero_shot_model)
        return CLIPZeroShotClassifier.from_clip(clip, tokenizer, load_target(args).attributes)
    return load_any_classifier(name, "cpu")  # moved to the accelerator's device by the caller


def load_target(args, classifier_attributes=None) -> TargetDistribution:
    if args.target_config:
        return TargetDistribution.from_file(args.target_config, attributes=classifier_attributes)
    return TargetDistribution.from_string(args.target, attributes=classifier_attributes)


# `--semantics_encoders` names of the miniature world's encoders -> which of them each selects.
MINIATURE_SEMANTICS = {"miniature": ("clip", "dino"), "miniature-clip": ("clip",), "miniature-dino": ("dino",)}


def load_semantics(args):
    encoders = {}
    for name in args.semantics_encoders:
        if name in MINIATURE_SEMANTICS:
            for kind in MINIATURE_SEMANTICS[name]:
                encoders[kind] = load_clip("miniature", "cpu")[0] if kind == "clip" else load_dino("miniature", "cpu")
        else:
            from transformers import AutoModel

            encoders[os.path.basename(name.rstrip("/"))] = AutoModel.from_pretrained(name)
    return ImageSemanticsLoss(encoders) if encoders else None


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator determined by the seed and the step's keys: resuming reproduces the same noise and prompts."""
    return torch.Generator().manual_seed(zlib.crc32(json.dumps([seed, *keys]).encode()))


def main(input_args: list[str] | None = None) -> dict:
    args = parse_args(input_args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    check_processes_joined(accelerator)
    device = accelerator.device

    # 1. Models, target, losses
    pipe = load_pipeline(args).to(device)
    if args.gradient == "biased":  # DPM-Solver++ with the chosen step weights; evaluations sample with it too
        pipe.scheduler = BiasedGradientScheduler.from_config(
            pipe.scheduler.config, gradient_scaling=args.gradient_scaling
        )
    classifier = load_classifier(args.classifier, args).to(device).eval()
    target = load_target(args, classifier.attributes)
    missing = sorted(set(target.attributes) - set(classifier.attributes))
    if missing:
        raise ValueError(
            f"The target aligns {missing}, which `--classifier` {args.classifier!r} does not predict "
            f"(it has {sorted(classifier.attributes)})."
        )
    semantics = load_semantics(args)
    objective = FairFinetuningObjective(
        classifier,
        DistributionalAlignmentLoss(target, args.confidence_threshold, classifier.attributes, seed=args.seed),
        semantics,
        args.lambda_img_agree,
        args.lambda_img_nonface,
        args.lambda_img_face,
        face_detector=load_detector(args.face_detector) if args.face_detector else None,
        face_crop_size=args.face_crop_size,
    ).to(device)
    eval_name = args.eval_classifier or args.classifier
    eval_classifier = (
        classifier if eval_name == args.classifier else load_classifier(eval_name, args).to(device).eval()
    )
    try:  # what a model exactly on target measures with this many images: the lowest bias the evaluation can show
        floor = sampling_floor(eval_classifier.attributes, args.eval_images_per_prompt, target)
    except ValueError as error:
        raise ValueError(f"`--eval_classifier` {eval_name!r} cannot measure the target: {error}") from error
    context_classifier = load_classifier(args.context_classifier, args).to(device) if args.context_classifier else None
    # The semantics loss's encoders also measure how similar each adapted image stays to its original (CLIP-I, DINO).
    similarity = dict(semantics.encoders) if semantics is not None else None
    reference_cache = {}  # what evaluations measure on the base model's images, kept between them
    grid_cache = {}  # the validation grids' base-model rows, kept between them
    train_prompts, eval_prompts = load_prompts(args.train_prompts), load_prompts(args.eval_prompts)
    selection_prompts = load_prompts(args.selection_prompts) if args.selection_prompts else None
    shared = sorted(set(selection_prompts or []) & set(eval_prompts))
    if shared:
        raise ValueError(
            f"`--selection_prompts` {args.selection_prompts!r} shares {len(shared)} prompts with `--eval_prompts` "
            f"(e.g. {shared[0]!r}): picking the adaptor on them would select on the evaluation; give validation "
            "prompts disjoint from the eval prompts."
        )

    set_seed(args.seed)  # the adaptor's initialisation
    adapters = add_fair_adapters(pipe, args.finetune, rank=args.rank, num_prefix_tokens=args.num_prefix_tokens)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.gradient_checkpointing_enable()
    params = adapters.parameters()
    selection = CheckpointSelection(adapters, args.selection_min_similarity) if selection_prompts else None
    weight_decay = 0.0 if args.finetune == "prompt_prefix" else 1e-2  # decay would move the frozen embedding rows
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=weight_decay)
    # Accelerate steps a prepared scheduler once per process at each optimizer step, hence the factors.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    # Only the adaptor (and the selected one's state) goes into checkpoints (safetensors), next to Accelerate's
    # optimizer / scheduler / RNG state. Every process holds the same adaptor; one writes it (two writers would share
    # its temporary file).
    skipped_steps = []  # steps whose gradient was not finite (reported in evaluation.json and the card)

    def save_state(models, weights, folder):
        if accelerator.is_main_process:
            adapters.save_state(folder)
            atomic_write_json(os.path.join(folder, "skipped_steps.json"), skipped_steps)
            if selection is not None:
                selection.save(folder)

    def load_state(models, folder):
        adapters.load_state(folder)
        path = os.path.join(folder, "skipped_steps.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                skipped_steps[:] = json.load(f)
        if selection is not None:
            selection.load(folder)

    accelerator.register_save_state_pre_hook(save_state)
    accelerator.register_load_state_pre_hook(load_state)

    # One row for the one prompt of each engine call; the pipeline repeats it per image.
    negative_prompt_embeds = frozen_unconditional_embeds(pipe) if args.frozen_unconditional else None

    # 2. Resume
    global_step = 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            checkpoints = list_checkpoints(args.output_dir)
            path = os.path.join(args.output_dir, checkpoints[-1]) if checkpoints else None
        if path is None:
            logger.info("No checkpoint to resume from; starting a new run.")
        else:
            match = CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
            if not os.path.isdir(path) or match is None:
                raise ValueError(
                    f"`--resume_from_checkpoint` {path!r} is not a checkpoint folder written by this script "
                    "(`checkpoint-STEP` in `--output_dir`); give one of those, or 'latest'."
                )
            global_step = int(match.group(1))
            if global_step > args.max_train_steps:
                raise ValueError(
                    f"`--resume_from_checkpoint` {path!r} is at step {global_step}, past `--max_train_steps` "
                    f"{args.max_train_steps}; raise `--max_train_steps` or resume from an earlier checkpoint."
                )
            accelerator.load_state(path)
            logger.info(f"Resumed from {path} at step {global_step}.")

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, list)}
        if args.report_to:
            accelerator.init_trackers("fair-finetuning", config=tracker_config)

    # 3. Evaluation before training (the base model: adaptors disabled); the same one at validations and at the end
    run_evaluation = functools.partial(
        evaluate,
        accelerator,
        adapters,
        eval_prompts,
        eval_classifier,
        context_classifier,
        args,
        similarity=similarity,
        reference_cache=reference_cache,
    )
    # A resumed run reuses the main process's saved evaluation. The main process decides for all: the others run the
    # evaluation's collectives only if it does (other nodes may not see its output folder).
    before_path = os.path.join(args.output_dir, "evaluation_before.json")
    saved = [None]
    if accelerator.is_main_process and global_step > 0 and os.path.isfile(before_path):
        with open(before_path, encoding="utf-8") as f:
            saved[0] = json.load(f)
    broadcast_object_list(saved)
    evaluation = {"before": saved[0]}
    if saved[0] is None:
        evaluation["before"] = run_evaluation(False)
        if accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            atomic_write_json(before_path, evaluation["before"])

    def select(step: int) -> None:
        # The selection measures with the training classifier and encoders (the eval classifier stays independent).
        guarded = selection.min_similarity is not None
        metrics = evaluate(
            accelerator,
            adapters,
            selection_prompts,
            classifier,
            None,
            args,
            True,
            similarity=similarity if guarded else None,
            reference_cache=reference_cache,
            num_images_per_prompt=args.selection_images_per_prompt,
        )["summary"]
        score = sum(metrics[f"bias/{a}"][0] for a in target.attributes) / len(target.attributes)
        measured = {"selection/bias": score}
        if guarded:
            similarities = [metrics[f"{name}_similarity"][0] for name in similarity]
            measured["selection/similarity"] = sum(similarities) / len(similarities)
        selection.update(step, score, measured.get("selection/similarity"))
        accelerator.log(measured, step=step)
        summary = ", ".join(f"{name} {value:.3f}" for name, value in measured.items())
        logger.info(f"Step {step}: {summary} (kept: step {selection.selected_step})")

    # 4. Training loop: pick prompts, draw noise, one engine call for finetuned + original images, losses, step
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    while global_step < args.max_train_steps:
        start = time.perf_counter()
        logs = {}
        for micro in range(args.gradient_accumulation_steps):
            # Every process trains on the same prompts (key 0), each with its own noise: the gathered transport then
            # aligns one prompt's images from all processes.
            order = step_generator(args.seed, global_step, micro, 0)
            picks = torch.randint(len(train_prompts), (args.train_batch_size,), generator=order).tolist()
            steps = args.num_inference_steps + int(
                torch.randint(
                    -args.num_inference_steps_jitter, args.num_inference_steps_jitter + 1, (1,), generator=order
                )
            )
            for k, pick in enumerate(picks):
                prompt = train_prompts[pick]
                with accelerator.autocast():
                    out = pipe(
                        prompt=adapters.apply_prompt([prompt]),
                        height=args.resolution,
                        width=args.resolution,
                        num_images_per_prompt=args.images_per_prompt,
                        num_inference_steps=steps,
                        guidance_scale=args.guidance_scale,
                        negative_prompt_embeds=negative_prompt_embeds,
                        generator=step_generator(args.seed, global_step, micro, k, accelerator.process_index),
                        output_type="pt",
                        gradient=args.gradient,
                        backprop_steps=args.backprop_steps,
                        backprop_generator=step_generator(args.seed, global_step, micro, k, -1),
                        return_original=True,
                        original_prompt=[prompt],
                    )
                    loss, step_logs = objective(
                        out.images.float(),
                        out.original_images.float(),
                        gather=gather,
                        process_index=accelerator.process_index,
                    )
                accelerator.backward(loss / (args.gradient_accumulation_steps * len(picks)))
                for key, value in step_logs.items():
                    logs[key] = logs.get(key, 0.0) + value / (args.gradient_accumulation_steps * len(picks))
        # Data parallelism without DDP wrappers (the pipeline calls the modules itself): average the gradients.
        for p in params:
            if p.grad is not None and accelerator.num_processes > 1:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        # With fp16's gradient scaler, an overflow must reach `optimizer.step()`: the scaler skips that update itself
        # and lowers its scale (skipping the call here would keep the scale, and every later step would overflow).
        if finite or accelerator.scaler is not None:
            grad_norm = float(accelerator.clip_grad_norm_(params, args.max_grad_norm))
            optimizer.step()
            finite = not accelerator.optimizer_step_was_skipped
        if finite:
            logs["grad_norm"] = grad_norm
            lr_scheduler.step()
        else:
            logger.warning(f"Step {global_step + 1}: the gradient is not finite; the update is skipped.")
            logs["skipped_steps"] = 1.0
            skipped_steps.append(global_step + 1)
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        logs.update(lr=lr_scheduler.get_last_lr()[0], step_time=time.perf_counter() - start)
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss/total']:.3f}")
        accelerator.log(logs, step=global_step)

        validating = global_step % args.validation_steps == 0 and global_step < args.max_train_steps
        if validating and selection is not None:  # before the checkpoint, which holds the selection
            select(global_step)
        if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
            save_checkpoint(accelerator, args, global_step)
        if validating:
            metrics = run_evaluation(True)
            accelerator.log({f"eval/{k}": v[0] for k, v in metrics["summary"].items()}, step=global_step)
            logger.info(f"Step {global_step}: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in metrics["summary"].items()))
            if accelerator.is_main_process:
                write_validation_grid(adapters, eval_prompts, eval_classifier, args, global_step, grid_cache)

    # 5. Final evaluation, adaptor, model card, Hub
    if selection is not None:
        if not selection.has_score(global_step):  # a run resumed at its last step has it
            select(global_step)
        selection.restore()
        evaluation["selection"] = {
            "prompts": args.selection_prompts,
            "images_per_prompt": args.selection_images_per_prompt,
            "min_similarity": selection.min_similarity,
            "history": selection.history,
            "selected_step": selection.selected_step,
        }
        if selection.min_similarity is None:
            logger.info(f"Keeping the adaptor of step {selection.selected_step} (lowest selection bias).")
        elif selection.eligible_steps:
            logger.info(
                f"Keeping the adaptor of step {selection.selected_step} (lowest selection bias among the steps with "
                f"similarity >= {selection.min_similarity})."
            )
        else:
            logger.warning(
                f"No step's selection similarity reached --selection_min_similarity {selection.min_similarity}; "
                f"keeping the most similar one, step {selection.selected_step}."
            )
    evaluation["skipped_steps"] = list(skipped_steps)
    if skipped_steps:
        logger.warning(
            f"{len(skipped_steps)} of {args.max_train_steps} steps were skipped (gradient not finite): steps "
            f"{skipped_steps}. They are listed in evaluation.json and the model card."
        )
    evaluation["after"] = run_evaluation(True)
    evaluation["sampling_floor"] = {k: v for k, v in floor.items() if k in evaluation["after"]["summary"]}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weight_name = adapters.save_pretrained(args.output_dir)
        grid = write_validation_grid(adapters, eval_prompts, eval_classifier, args, global_step, grid_cache)
        copy = functools.partial(shutil.copyfile, os.path.join(args.output_dir, grid))
        atomic_write(os.path.join(args.output_dir, "validation_grid.png"), copy)
        atomic_write_json(os.path.join(args.output_dir, "evaluation.json"), evaluation)
        # The repo first, so that the card's loading code names the repo id the Hub gives it.
        repo_id = create_hub_repo(args) if args.push_to_hub else None
        write_model_card(args, target, weight_name, evaluation, len(eval_prompts), "validation_grid.png", repo_id)
        before = evaluation["before"]["summary"]
        for name, (mean, sd) in evaluation["after"]["summary"].items():
            start = f"{before[name][0]:.3f} ± {before[name][1]:.3f} -> " if name in before else ""
            end = f" (sampling floor {floor[name]:.3f})" if name in floor else ""
            logger.info(f"{name} on the eval prompts: {start}{mean:.3f} ± {sd:.3f}{end}")
        if repo_id is not None:
            upload_to_hub(args, repo_id)
    accelerator.end_training()
    return evaluation


def evaluate(
    accelerator,
    adapters,
    prompts,
    classifier,
    context,
    args,
    enabled,
    similarity=None,
    reference_cache=None,
    num_images_per_prompt=None,
) -> dict:
    # Each process evaluates its share of the prompts (images are seeded per prompt and image, so the split does not
    # change them); with one `reference_cache` for a run, the base model's images are generated and measured once.
    share = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    result = evaluate_adapters(
        adapters,
        [prompts[i] for i in share],
        classifier,
        num_images_per_prompt or args.eval_images_per_prompt,
        context,
        enabled,
        seed=args.seed,
        similarity_encoders=similarity,
        reference_cache=reference_cache,
        frozen_unconditional=args.frozen_unconditional,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
    )
    if accelerator.num_processes == 1:
        return result
    # Gathered in process order: process r's rows are prompts r, r + N, r + 2N, ...
    order = [
        i for rank in range(accelerator.num_processes) for i in range(rank, len(prompts), accelerator.num_processes)
    ]
    rows = dict(zip(order, gather_object(result["per_prompt"])))
    rows = [rows[i] for i in range(len(prompts))]
    return {"per_prompt": rows, "summary": summarize_per_prompt(rows)}


CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(output_dir: str) -> list[str]:
    """The complete checkpoints in `output_dir`, oldest first (a save cut short leaves a `.partial` folder)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    found = [name for name in names if CHECKPOINT.fullmatch(name)]
    return sorted(found, key=lambda name: int(CHECKPOINT.fullmatch(name).group(1)))


def save_checkpoint(accelerator, args, step: int) -> None:
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        checkpoints = list_checkpoints(args.output_dir)
        for old in checkpoints[: max(len(checkpoints) - args.checkpoints_total_limit + 1, 0)]:
            shutil.rmtree(os.path.join(args.output_dir, old))
    # Written beside its final name, then renamed once every process has written its part: a kill mid-save leaves a
    # `.partial` folder that `--resume_from_checkpoint latest` ignores, never a half-written checkpoint.
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    partial = final + ".partial"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


def write_validation_grid(adapters, eval_prompts, classifier, args, step: int, reference_cache=None) -> str:
    """Base (upper) and adapted (lower) images per validation prompt, same noise; returns the PNG's relative path."""
    grid = validation_grid(
        adapters,
        args.validation_prompts or eval_prompts[:3],
        classifier,
        args.num_validation_images,
        seed=args.seed,
        frozen_unconditional=args.frozen_unconditional,
        reference_cache=reference_cache,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
    )
    path = os.path.join("validation", f"step-{step:06d}.png")
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    atomic_write(os.path.join(args.output_dir, path), lambda tmp: grid.save(tmp, format="PNG"))
    return path


def write_model_card(
    args, target, weight_name: str, evaluation: dict, num_eval_prompts: int, grid: str, repo_id: str | None = None
) -> None:
    if args.pretrained_model_name_or_path == MINIATURE:
        load = "from diffusers_fair.miniature import load_pipeline\n\npipe = load_pipeline()\n"
    else:
        load = (
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")\n'
        )
    adaptor = repo_id or args.hub_model_id or args.output_dir
    prompt = "a photo of the face of a doctor, a person"
    if not weight_name.startswith("pytorch_lora"):
        usage = load + (
            f'pipe.load_textual_inversion("{adaptor}", weight_name="{weight_name}")\n'
            "# every prompt starts with the learned token\n"
            f'image = pipe("<fair> {prompt}").images[0]'
        )
    elif args.frozen_unconditional:
        usage = load + (
            "# Trained with --frozen_unconditional: guidance's empty prompt comes from the base text encoder.\n"
            'negative_prompt_embeds = pipe.encode_prompt("", pipe.device, 1, False)[0]  # before the adaptor\n'
            f'pipe.load_lora_weights("{adaptor}")\n'
            f'image = pipe("{prompt}", negative_prompt_embeds=negative_prompt_embeds).images[0]'
        )
    else:
        usage = load + f'pipe.load_lora_weights("{adaptor}")\nimage = pipe("{prompt}").images[0]'
    settings = {
        key: getattr(args, key)
        for key in (
            "finetune",
            "num_prefix_tokens" if args.finetune == "prompt_prefix" else "rank",
            "learning_rate",
            "max_train_steps",
            "train_batch_size",
            "images_per_prompt",
            "resolution",
            "num_inference_steps",
            "num_inference_steps_jitter",
            "guidance_scale",
            "frozen_unconditional",
            "gradient",
            "gradient_scaling",
            "backprop_steps",
            "confidence_threshold",
            "lambda_img_agree",
            "lambda_img_nonface",
            "lambda_img_face",
            "semantics_encoders",
            "train_prompts",
            "eval_prompts",
            "seed",
        )
    }
    if evaluation.get("skipped_steps"):
        settings["skipped_steps (gradient not finite)"] = evaluation["skipped_steps"]
    if "selection" in evaluation:
        settings["selection_prompts"] = args.selection_prompts
        settings["selection_min_similarity"] = args.selection_min_similarity
        settings["selected_step"] = evaluation["selection"]["selected_step"]
    # Float rounding differs between machines and library versions, and so does a training run's trajectory.
    settings["software"] = ", ".join(f"{name} {version}" for name, version in versions().items())
    card = make_model_card(
        base_model=args.pretrained_model_name_or_path,
        target=target.to_string(),
        classifier=args.classifier,
        attributes=list(target.attributes),
        metrics_before=evaluation["before"]["summary"],
        metrics_after=evaluation["after"]["summary"],
        settings=settings,
        usage=usage,
        eval_classifier=args.eval_classifier,
        num_eval_prompts=num_eval_prompts,
        eval_images_per_prompt=args.eval_images_per_prompt,
        grid=grid,
        sampling_floor=evaluation["sampling_floor"],
    )
    atomic_write(os.path.join(args.output_dir, "README.md"), card.save)


def create_hub_repo(args) -> str:
    """Creates (or reuses) the Hub repo: `--hub_model_id`, else the output folder's name; returns the repo id."""
    from huggingface_hub import create_repo

    return create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token).repo_id


def upload_to_hub(args, repo_id: str) -> None:
    """Uploads `--output_dir` to `repo_id`, without checkpoints, logs or temporary files."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="Fairness adaptor trained with diffusers-fair",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp"],
        token=args.hub_token,
    )


if __name__ == "__main__":
    main()
