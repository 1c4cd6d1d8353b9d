"""Tiny models built in code (no Hub), as diffusers' fast tests do: Stable Diffusion components, CLIP, DINOv2."""

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

from diffusers_fair import AttributeClassifier, BiasedGradientScheduler, FairStableDiffusionPipeline

WORDS = ["a", "photo", "of", "the", "face", "doctor", "nurse", "person", "painter", "hair", "long", "short", ","]


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the bytes 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A real `CLIPTokenizer` over a byte-level BPE vocabulary in which every word of `WORDS` is one token."""
    byte_chars = byte_level_alphabet()
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # The tokenizer reads both files when it is built, so the folder can go right after (no leak per test).
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        return CLIPTokenizer(
            os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77
        )


def tiny_components(
    seed: int = 0,
    scheduler_kwargs: dict | None = None,
    unet_channels: tuple[int, int] = (8, 16),
    vae_channels: tuple[int, int] = (8, 16),
    text_width: int = 16,
    latent_size: int = 8,
    norm_groups: int = 4,
    attention_head_dim: int = 4,
) -> dict:
    """The components of a small Stable Diffusion with random weights: by default 16x16 pixels (8x8x4 latents).

    The sizes are arguments so the CPU benchmark can build a larger model of the same shape.
    """
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=unet_channels,
        layers_per_block=1,
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_groups,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=norm_groups,
        sample_size=2 * latent_size,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = BiasedGradientScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **(scheduler_kwargs or {})
    )
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)  # frozen base weights, as in training; adapters added later train
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_pipeline(pipeline_class=FairStableDiffusionPipeline, **kwargs):
    pipe = pipeline_class(**tiny_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_model(image_size: int = 16, hidden_size: int = 32, projection_dim: int = 16) -> CLIPModel:
    """A random-weight `CLIPModel` whose text side fits `tiny_clip_tokenizer()`."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    text_config = {"vocab_size": len(tokenizer), "max_position_embeddings": 77}
    text_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_config.update(pad_token_id=tokenizer.pad_token_id)
    shared = {"hidden_size": hidden_size, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision_config = {"image_size": image_size, "patch_size": 8, **shared}
    config = CLIPConfig(
        text_config={**text_config, **shared}, vision_config=vision_config, projection_dim=projection_dim
    )
    return CLIPModel(config).eval()


def tiny_dino_model(image_size: int = 16, hidden_size: int = 32) -> Dinov2Model:
    """A random-weight `Dinov2Model`."""
    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=image_size,
        patch_size=8,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    return Dinov2Model(config).eval()


class BrightnessClassifier(AttributeClassifier):
    """`brightness` {dark, bright} from the mean pixel value: a differentiable, deterministic stand-in classifier."""

    def __init__(self, attributes=None, threshold: float = 0.5):
        super().__init__(attributes or {"brightness": ["dark", "bright"]}, threshold=threshold)
        self.threshold = threshold

    def forward(self, images):
        score = (images.mean(dim=(1, 2, 3)) - self.threshold) * 50
        return {"brightness": torch.stack([-score, score], dim=-1)}
