"""Differentiable face crops (for the classifier and the face-realism loss) and face-region masks."""

import torch
import torch.nn.functional as F

from ..semantics import ImageSemanticsLoss

# Context around the detector's box, as a fraction of its longer side per edge. 0: a RetinaFace box (brow to chin)
# already spans what dlib's face chips with padding 0.2 span (the input of the offline classifiers; FairFace's crops
# use dlib chips with padding 0.25). Measured on skimage's astronaut: dlib's chip square is 0.93x the box's side.
DEFAULT_MARGIN = 0.0
# Bilinear sampling of a crop much larger than the output aliases; sample at up to this many times the output side,
# then average down.
MAX_SUPERSAMPLING = 4


def _check_boxes(boxes: torch.Tensor, batch: int) -> torch.Tensor:
    boxes = torch.as_tensor(boxes)
    if boxes.shape != (batch, 4):
        raise ValueError(
            f"`boxes` must have shape (B, 4) = ({batch}, 4) as (x0, y0, x1, y1), got {tuple(boxes.shape)}."
        )
    found = ~torch.isnan(boxes).any(dim=1)
    empty = found & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"`boxes` rows {rows} have zero or negative area ({boxes[empty].tolist()}): a face box needs x1 > x0 and "
            "y1 > y0. Mark images without a face with a row of NaN instead."
        )
    return boxes


def square_boxes(boxes: torch.Tensor, margin: float = DEFAULT_MARGIN) -> torch.Tensor:
    r"""
    The square crop regions of [`crop_faces`]: centred on each box, side `max(w, h) * (1 + 2 * margin)`.

    Args:
        boxes (`torch.Tensor` of shape `(B, 4)`): `(x0, y0, x1, y1)` in pixels; NaN rows stay NaN.
        margin (`float`, *optional*, defaults to 0.0): Added on each side, as a fraction of the box's longer side.

    Returns:
        `torch.Tensor` of shape `(B, 4)`: the squares `(x0, y0, x1, y1)`; they may extend past the image.
    """
    if not margin > -0.5:
        raise ValueError(f"`margin` must be greater than -0.5 (a fraction of the box side per edge), got {margin}.")
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) * (0.5 + margin)
    return torch.cat([center - half, center + half], dim=1)


def crop_faces(
    images: torch.Tensor, boxes: torch.Tensor, size: int = 224, margin: float = DEFAULT_MARGIN
) -> torch.Tensor:
    r"""
    Differentiable square crop-and-resize of one face per image (bilinear `grid_sample`).

    The crop is the square of [`square_boxes`]; parts outside the image are black (zeros), as in dlib's face chips.
    When the square is at least twice `size`, it is sampled at `floor(side / size)` times `size` (at most 4x) and
    area-averaged down, to avoid aliasing. The factor is chosen per square, so each crop depends only on its own image
    and box, never on the rest of the batch. Gradients reach only the pixels under the square (plus the one-pixel
    bilinear support at its edge).

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`): Values in `[0, 1]`.
        boxes (`torch.Tensor` of shape `(B, 4)`):
            `(x0, y0, x1, y1)` in pixels (e.g. from [`largest_face`]); a row of NaN means no face and gives a black
            crop with no gradient. Boxes of zero area are refused.
        size (`int`, *optional*, defaults to 224): Side of the output crops.
        margin (`float`, *optional*, defaults to 0.0): Context on each side, as a fraction of the box's longer side
            (`DEFAULT_MARGIN`; a RetinaFace box already matches the extent of dlib's and FairFace's face chips).

    Returns:
        `torch.Tensor` of shape `(B, 3, size, size)`, in the images' dtype and device.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must have shape (B, 3, H, W), got {tuple(images.shape)}.")
    if int(size) != size or size < 1:
        raise ValueError(f"`size` must be a positive integer, got {size}.")
    batch, _, height, width = images.shape
    boxes = _check_boxes(boxes, batch).to(images.device)
    found = ~torch.isnan(boxes).any(dim=1)
    squares = square_boxes(torch.where(found[:, None], boxes, boxes.new_tensor([0.0, 0.0, width, height])), margin)
    side = (squares[:, 2] - squares[:, 0]).to(torch.float64)
    # The supersampling factor is per square, not per batch: a crop must be a function of its own image and box (the
    # audit crops image by image, training crops batches of varying content). No-face rows are blanked below, so they
    # take the cheapest factor; they stay in the graph so that the images always get a (zero) gradient.
    factors = torch.floor(side / size).clamp(1, MAX_SUPERSAMPLING).to(torch.int64)
    factors = torch.where(found, factors, torch.ones_like(factors))
    # affine_grid maps output coordinates u in [-1, 1] to input coordinates normalised by the image size
    # (align_corners=False: -1 and 1 are the outer edges of the border pixels).
    center = (squares[:, :2] + squares[:, 2:]) / 2
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = (squares[:, 2] - squares[:, 0]) / width
    theta[:, 1, 1] = (squares[:, 3] - squares[:, 1]) / height
    theta[:, 0, 2] = 2 * center[:, 0] / width - 1
    theta[:, 1, 2] = 2 * center[:, 1] / height - 1
    groups, rows_of_groups = [], []
    for factor in factors.unique().tolist():
        rows = (factors == factor).nonzero().flatten()
        sample = size * factor
        grid = F.affine_grid(theta[rows], (len(rows), 3, sample, sample), align_corners=False)
        group = F.grid_sample(images[rows], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        groups.append(F.avg_pool2d(group, factor) if factor > 1 else group)
        rows_of_groups.append(rows)
    crops = torch.cat(groups)[torch.cat(rows_of_groups).argsort()]
    return torch.where(found.view(-1, 1, 1, 1), crops, torch.zeros_like(crops))


def face_region_masks(boxes: torch.Tensor, height: int, width: int, margin: float = 0.0) -> torch.Tensor:
    r"""
    Pixels inside each face box, for the semantics loss's region weights.

    The mask is the one `ImageSemanticsLoss.region_weights` uses (a pixel belongs to the box when its centre lies in
    it); for the weights themselves pass the boxes to `region_weights` directly.

    Args:
        boxes (`torch.Tensor` of shape `(B, 4)`): `(x0, y0, x1, y1)` in pixels; a NaN row (no face) gives an empty
            mask.
        height (`int`), width (`int`): Image size.
        margin (`float`, *optional*, defaults to 0.0): Grow each box to the square of [`square_boxes`] with this
            margin first (`0.0` keeps the box as is).

    Returns:
        `torch.Tensor` of shape `(B, 1, height, width)`, bool.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"`boxes` must have shape (B, 4), got {tuple(boxes.shape)}.")
    if margin:
        boxes = square_boxes(boxes, margin)
    agree = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    weights = ImageSemanticsLoss.region_weights(
        agree, boxes, height, width, lambda_agree=0.0, lambda_background=0.0, lambda_face=1.0
    )
    return weights > 0
