"""Model definitions of the miniature world: component configs and the attribute / context classifiers."""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from ..classifiers.base import AttributeClassifier
from .world import IMAGE_SIZE


class MiniatureClassifier(AttributeClassifier):
    r"""
    A small CNN classifier for the miniature world's 32x32 images, one linear head per attribute.

    Two instances with different `kernel_size` / `width` / `activation` / `pooling` (and seeds, and training data
    augmentation) are the "train" classifier used by the alignment loss and the independent "eval" classifier, as
    the paper evaluates with classifiers it did not train against. The same class with the attribute
    `{"occupation": [...]}` is the context classifier that measures semantics preservation.

    Args:
        attributes (`dict[str, list[str]]`): attribute name to its ordered class names.
        width (`int`, *optional*, defaults to 32): channels of the first convolution (then 2x, 2x).
        kernel_size (`int`, *optional*, defaults to 3): odd convolution kernel size.
        activation (`str`, *optional*, defaults to `"relu"`): `"relu"` or `"gelu"`.
        pooling (`str`, *optional*, defaults to `"max"`): `"max"` or `"avg"` 2x2 downsampling.
    """

    def __init__(
        self,
        attributes: dict[str, list[str]],
        width: int = 32,
        kernel_size: int = 3,
        activation: str = "relu",
        pooling: str = "max",
    ):
        super().__init__(attributes, width=width, kernel_size=kernel_size, activation=activation, pooling=pooling)
        if kernel_size % 2 != 1:
            raise ValueError(f"`kernel_size` must be odd so that convolutions keep the size, got {kernel_size}.")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"`activation` must be 'relu' or 'gelu', got {activation!r}.")
        if pooling not in ("max", "avg"):
            raise ValueError(f"`pooling` must be 'max' or 'avg', got {pooling!r}.")
        act = nn.ReLU if activation == "relu" else nn.GELU
        pool = nn.MaxPool2d if pooling == "max" else nn.AvgPool2d
        layers, channels = [], 3
        for out_channels in (width, 2 * width, 2 * width):
            layers += [nn.Conv2d(channels, out_channels, kernel_size, padding=kernel_size // 2), act(), pool(2)]
            channels = out_channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        hidden = 64
        self.trunk = nn.Sequential(nn.Linear(channels * (IMAGE_SIZE // 8) ** 2, hidden), act())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(hidden, len(classes)) for name, classes in self.attributes.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, 32, 32)`): values in `[0, 1]`.

        Returns:
            `dict[str, torch.Tensor]`: attribute -> logits of shape `(B, K)`.
        """
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"`images` must have shape (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}; resize "
                "generated images to the miniature resolution first."
            )
        hidden = self.trunk(self.features(images * 2.0 - 1.0))
        return {name: head(hidden) for name, head in self.heads.items()}


def make_vae() -> AutoencoderKL:
    """The miniature VAE: 32x32x3 images to 8x8x4 latents, 0.17M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def make_unet() -> UNet2DConditionModel:
    """The miniature U-Net on 8x8x4 latents with 64-wide cross-attention, ~1.5M parameters."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _text_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def make_clip(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPModel:
    """The miniature `CLIPModel`: 2-layer 64-wide text and ViT (patch 4 on 32x32) towers, 64-d projections."""
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=64,
    )
    config = CLIPConfig(
        text_config=_text_config(vocab_size, bos_token_id, eos_token_id), vision_config=vision, projection_dim=64
    )
    return CLIPModel(config)


def make_dino() -> Dinov2Model:
    """The miniature `Dinov2Model`: 2 layers, width 64, 4 heads, MLP ratio 2, patch 4 on 32x32 images (64 patches)."""
    config = Dinov2Config(
        image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2
    )
    return Dinov2Model(config)
