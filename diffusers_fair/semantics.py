"""The image semantics preserving loss (paper Eq. 7) with the dynamic per-image and per-region weights (Sec. 4.1)."""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Normalisation constants of the transformers image processors (CLIPImageProcessor, BitImageProcessor for DINOv2).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_images(
    images: torch.Tensor,
    resize_size: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    r"""
    Differentiable version of the transformers image processors: resize the shorter side, center-crop, normalise.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`): Values in `[0, 1]`.
        resize_size (`int`): Length of the shorter side after the (bicubic, antialiased) resize.
        crop_size (`int`): Side of the square center crop, `<= resize_size`.
        mean (`Sequence[float]`), std (`Sequence[float]`): Per-channel normalisation.

    Returns:
        `torch.Tensor` of shape `(B, 3, crop_size, crop_size)`, gradients flowing back to `images`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must have shape (B, 3, H, W), got {tuple(images.shape)}.")
    if crop_size > resize_size:
        raise ValueError(f"`crop_size` ({crop_size}) must not exceed `resize_size` ({resize_size}).")
    height, width = images.shape[-2:]
    scale = resize_size / min(height, width)
    new_size = (max(resize_size, round(height * scale)), max(resize_size, round(width * scale)))
    if new_size != (height, width):
        images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_size[0] - crop_size) // 2, (new_size[1] - crop_size) // 2
    images = images[..., top : top + crop_size, left : left + crop_size]
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def _is_clip(model: nn.Module) -> bool:
    return hasattr(model, "get_image_features") or type(model).__name__ == "CLIPVisionModelWithProjection"


class ImageFeatureExtractor(nn.Module):
    r"""
    Global image features of a transformers vision model from `[0, 1]` images, differentiably.

    A `CLIPModel` gives its projected image embedding (`get_image_features`; transformers 5 returns an output object
    whose `.pooler_output` is the embedding), a `CLIPVisionModelWithProjection` its `image_embeds`, any other model
    (e.g. `Dinov2Model`) its `pooler_output` (for DINOv2, the layer-normed CLS token).

    Args:
        model (`nn.Module`): The encoder; it is used as is (freeze it yourself if it is shared).
        crop_size (`int`, *optional*): Input side. Defaults to the CLIP config's `image_size`, and 224 otherwise
            (the DINOv2 image processor's crop).
        resize_size (`int`, *optional*): Shorter side before cropping. Defaults to `crop_size` for CLIP and
            `crop_size * 8 / 7` (256 for 224) otherwise, as the transformers processors do.
        mean (`Sequence[float]`, *optional*), std (`Sequence[float]`, *optional*): Defaults: CLIP's or ImageNet's.
    """

    def __init__(
        self,
        model: nn.Module,
        crop_size: int | None = None,
        resize_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.model = model
        self.is_clip = _is_clip(model)
        if crop_size is None:
            config = getattr(model, "config", None)
            vision_config = getattr(config, "vision_config", config)
            crop_size = getattr(vision_config, "image_size", 224) if self.is_clip else 224
        if resize_size is None:
            resize_size = crop_size if self.is_clip else round(crop_size * 8 / 7)
        self.crop_size, self.resize_size = int(crop_size), int(resize_size)
        self.mean = tuple(mean or (CLIP_MEAN if self.is_clip else IMAGENET_MEAN))
        self.std = tuple(std or (CLIP_STD if self.is_clip else IMAGENET_STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): Values in `[0, 1]`.

        Returns:
            `torch.Tensor` of shape `(B, D)`: unnormalised features, in the model's dtype.
        """
        dtype = next(self.model.parameters()).dtype
        pixels = preprocess_images(images, self.resize_size, self.crop_size, self.mean, self.std).to(dtype)
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixels)
        else:
            output = self.model(pixel_values=pixels)
            if hasattr(output, "image_embeds"):
                output = output.image_embeds
        return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_features(clip_model: nn.Module, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    r"""
    CLIP text embeddings of `prompts`: `(len(prompts), D)`, unnormalised, on the model's device.

    `tokenizer` is called as a transformers tokenizer: `tokenizer(prompts, padding=True, truncation=True,
    return_tensors="pt")`.
    """
    device = next(clip_model.parameters()).device
    inputs = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    output = clip_model.get_text_features(**inputs)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def scale_gradient(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""
    Returns `images` unchanged in value whose gradient is multiplied by `weights` on the way back.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`).
        weights (`torch.Tensor` broadcastable to `images`, e.g. `(B,)`-shaped reshaped to `(B, 1, 1, 1)` or a
            `(B, 1, H, W)` map): Non-negative gradient multipliers.
    """
    detached = images.detach()
    return detached + weights * (images - detached)


class ImageSemanticsLoss(nn.Module):
    r"""
    The image semantics preserving loss (paper Eq. 7): `1 - cos` between the features of each generated image and of
    the frozen model's image from the same noise, summed over encoders and averaged over the batch.

    The paper uses a CLIP ViT-H/14 (LAION) and DINOv2 ViT-B/14 ([`~ImageSemanticsLoss.from_pretrained`]); any
    number of encoders works. Preprocessing is done in torch so gradients reach the pixels; the encoders are frozen.

    Dynamic weights (paper Sec. 4.1) are applied as multipliers on the *gradient* w.r.t. the generated pixels (see
    [`~ImageSemanticsLoss.region_weights`]), not by masking the images: a masked image (face blacked out) is out of
    the encoders' distribution and would change the features of the whole image, and masking both images removes the
    face from the loss entirely (weight 0, not the small `lambda_img,3` the paper asks for). Scaling the gradient
    keeps the full-image features and makes the face pixels follow the original image `lambda_img,3 / lambda_img,2`
    times as strongly as the background. The returned value is therefore the *unweighted* mean distance (comparable
    across steps whatever the weights), and its gradient is the weighted one.

    Args:
        encoders (`dict[str, nn.Module]`):
            Name -> `CLIPModel`, `CLIPVisionModelWithProjection`, `Dinov2Model` (or an [`ImageFeatureExtractor`] for
            custom preprocessing). Plain models are wrapped with default preprocessing.
    """

    def __init__(self, encoders: Mapping[str, nn.Module]):
        super().__init__()
        if not isinstance(encoders, Mapping) or not encoders:
            raise ValueError("`encoders` must be a non-empty dict of name -> encoder, e.g. {'clip': clip_model}.")
        wrapped = {
            name: enc if isinstance(enc, ImageFeatureExtractor) else ImageFeatureExtractor(enc)
            for name, enc in encoders.items()
        }
        self.encoders = nn.ModuleDict(wrapped)
        self.encoders.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(
        cls,
        clip: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dino: str | None = "facebook/dinov2-base",
        torch_dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> "ImageSemanticsLoss":
        r"""
        Loads the paper's encoders from the Hugging Face Hub (or local folders).

        Args:
            clip (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`): A `CLIPModel`; `None`
                to skip.
            dino (`str`, *optional*, defaults to `"facebook/dinov2-base"`): A `Dinov2Model`; `None` to skip.
            torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Weights' dtype.
            kwargs: Passed to `from_pretrained` (e.g. `revision`, `cache_dir`).
        """
        from transformers import AutoModel, CLIPModel

        encoders = {}
        if clip is not None:
            encoders["clip"] = CLIPModel.from_pretrained(clip, dtype=torch_dtype, **kwargs)
        if dino is not None:
            encoders["dino"] = AutoModel.from_pretrained(dino, dtype=torch_dtype, **kwargs)
        return cls(encoders)

    @staticmethod
    def region_weights(
        agree: torch.Tensor,
        face_boxes: torch.Tensor | None,
        height: int,
        width: int,
        lambda_agree: float = 8.0,
        lambda_background: float = 1.6,
        lambda_face: float = 0.32,
    ) -> torch.Tensor:
        r"""
        The paper's dynamic weights as a per-pixel map: `lambda_img,1` on images whose target class agrees with the
        original image's class, otherwise `lambda_img,2` outside the face box and `lambda_img,3` inside it.

        Defaults are the paper's gender setting (8, 0.2 x 8, 0.2 x 0.2 x 8). For several attributes, build one map per
        attribute and take the elementwise minimum (an image that must change in any attribute is free to change).

        Args:
            agree (`torch.Tensor` of shape `(B,)`, bool):
                Whether image `i`'s target class equals the original image's predicted class. Pass `True` for
                images without a face (the paper applies only the semantics loss to them: keep them unchanged).
            face_boxes (`torch.Tensor` of shape `(B, 4)`, *optional*):
                Face boxes `(x0, y0, x1, y1)` in pixels of the `height x width` image; a row of NaN means no face
                (the whole image gets `lambda_background`). `None`: no boxes at all.
            height (`int`), width (`int`): Image size.
            lambda_agree (`float`), lambda_background (`float`), lambda_face (`float`): Non-negative weights.

        Returns:
            `torch.Tensor` of shape `(B, 1, height, width)` to pass as `pixel_weights`.
        """
        for name, value in (("lambda_agree", lambda_agree), ("lambda_background", lambda_background)):
            if value < 0:
                raise ValueError(f"`{name}` must be non-negative, got {value}.")
        if lambda_face < 0:
            raise ValueError(f"`lambda_face` must be non-negative, got {lambda_face}.")
        agree = torch.as_tensor(agree, dtype=torch.bool)
        if agree.ndim != 1:
            raise ValueError(f"`agree` must have shape (B,), got {tuple(agree.shape)}.")
        batch = agree.shape[0]
        weights = torch.full((batch, 1, height, width), float(lambda_background), device=agree.device)
        if face_boxes is not None:
            boxes = torch.as_tensor(face_boxes, dtype=torch.float32, device=agree.device)
            if boxes.shape != (batch, 4):
                raise ValueError(f"`face_boxes` must have shape (B, 4) = ({batch}, 4), got {tuple(boxes.shape)}.")
            # A pixel belongs to the box when its center lies inside it.
            ys = torch.arange(height, device=agree.device, dtype=torch.float32) + 0.5
            xs = torch.arange(width, device=agree.device, dtype=torch.float32) + 0.5
            x0, y0, x1, y1 = (boxes[:, i].view(batch, 1, 1, 1) for i in range(4))
            inside = (
                (xs.view(1, 1, 1, -1) >= x0)
                & (xs.view(1, 1, 1, -1) <= x1)
                & (ys.view(1, 1, -1, 1) >= y0)
                & (ys.view(1, 1, -1, 1) <= y1)
            )
            weights = torch.where(inside, torch.full_like(weights, float(lambda_face)), weights)
        return torch.where(agree.view(batch, 1, 1, 1), torch.full_like(weights, float(lambda_agree)), weights)

    def forward(
        self,
        images: torch.Tensor,
        original_images: torch.Tensor,
        pixel_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): Generated images in `[0, 1]` (differentiable).
            original_images (`torch.Tensor` of shape `(B, 3, H', W')`): The frozen model's images from the same
                noises, in `[0, 1]`; no gradient flows into them.
            pixel_weights (`torch.Tensor`, *optional*): Gradient multipliers of shape `(B,)` (per image) or
                `(B, 1, H, W)` (per pixel, see [`~ImageSemanticsLoss.region_weights`]).

        Returns:
            `(loss, distances)`: the scalar `mean_i sum_e (1 - cos)`, and encoder name -> `(B,)` distances `1 - cos`
            in `[0, 2]` (detached).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` must have shape (B, 3, H, W), got {tuple(images.shape)}.")
        if original_images.ndim != 4 or original_images.shape[:2] != images.shape[:2]:
            raise ValueError(
                f"`original_images` must have shape ({images.shape[0]}, 3, H, W) like `images`, got "
                f"{tuple(original_images.shape)}."
            )
        if pixel_weights is not None:
            pixel_weights = torch.as_tensor(pixel_weights, device=images.device, dtype=images.dtype)
            if pixel_weights.shape == (images.shape[0],):
                pixel_weights = pixel_weights.view(-1, 1, 1, 1)
            elif pixel_weights.shape != (images.shape[0], 1, *images.shape[-2:]):
                raise ValueError(
                    f"`pixel_weights` must have shape (B,) or (B, 1, H, W) = ({images.shape[0]}, 1, "
                    f"{images.shape[2]}, {images.shape[3]}), got {tuple(pixel_weights.shape)}."
                )
            images = scale_gradient(images, pixel_weights)
        total = 0.0
        distances = {}
        for name, encoder in self.encoders.items():
            features = encoder(images)
            with torch.no_grad():
                reference = encoder(original_images.detach())
            # Half-precision features are compared in fp32; fp64 (used by gradient checks) stays fp64.
            dtype = torch.promote_types(features.dtype, torch.float32)
            distance = 1.0 - F.cosine_similarity(features.to(dtype), reference.to(dtype), dim=-1)
            distances[name] = distance.detach()
            total = total + distance
        return total.mean(), distances
