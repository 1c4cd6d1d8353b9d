"""Image grids with one bar per attribute under each image, as the paper's figures: the audit's and the training's."""

import numpy as np
import torch

# Class colours of the grids' bars and the audit's plots (colour-blind friendly, Okabe-Ito).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
TILE = 96  # pixels of an image in the grids (nearest-neighbour upscaled when smaller)
BAR = 7  # pixels of one attribute bar under an image


def annotated_tile(image: np.ndarray, bars: list[tuple[int, float] | None]) -> np.ndarray:
    r"""
    One image upscaled to `TILE` pixels wide, with one bar per attribute under it: coloured by the predicted class
    (`PALETTE[class]`), as long as the classifier's confidence.

    Args:
        image (`np.ndarray` of shape `(H, W, 3)`, uint8): The image.
        bars (`list[tuple[int, float] | None]`): `(predicted class index, confidence in [0, 1])` per attribute;
            `None` draws an empty (grey) bar, for an image that was not classified (e.g. no face found).

    Returns:
        `np.ndarray` (uint8) of shape `(TILE * H / W + BAR * len(bars) + 2, TILE, 3)`.
    """
    from PIL import Image

    picture = Image.fromarray(image)
    if picture.width != TILE:
        resample = Image.NEAREST if picture.width < TILE else Image.BILINEAR
        picture = picture.resize((TILE, round(TILE * picture.height / picture.width)), resample)
    tile = np.full((picture.height + BAR * len(bars) + 2, TILE, 3), 255, dtype=np.uint8)
    tile[: picture.height] = np.asarray(picture)
    for k, bar in enumerate(bars):
        top = picture.height + 2 + BAR * k
        if bar is None:
            tile[top : top + BAR - 1] = 225
            continue
        cls, confidence = bar
        colour = np.array([int(PALETTE[cls % len(PALETTE)][i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
        length = max(1, round(TILE * confidence))
        tile[top : top + BAR - 1, :length] = colour
        tile[top : top + BAR - 1, length:] = 225
    return tile


def annotated_grid(
    rows: list[torch.Tensor],
    probabilities: list[dict[str, torch.Tensor]],
    included: list[torch.Tensor | None] | None = None,
) -> np.ndarray:
    r"""
    A grid of annotated tiles ([`annotated_tile`]): one row per entry of `rows`, white gaps between tiles and rows.

    Args:
        rows (`list[torch.Tensor]`): Per row, `(n, 3, H, W)` images in `[0, 1]` (every row the same `n`, `H`, `W`).
        probabilities (`list[dict[str, torch.Tensor]]`): Per row, attribute -> `(n, K)` class probabilities (a bar
            per attribute, in the dict's order).
        included (`list[torch.Tensor | None]`, *optional*): Per row, an `(n,)` boolean mask of the images that were
            classified; the others get empty bars (the audit's images without a face, excluded from its numbers).

    Returns:
        `np.ndarray` (uint8) of shape `(height, width, 3)`; save it with `PIL.Image.fromarray(grid).save(path)`.
    """
    if len(rows) != len(probabilities) or not rows:
        raise ValueError(
            f"`rows` and `probabilities` must be non-empty and of the same length, got {len(rows)} and "
            f"{len(probabilities)}."
        )
    if any(len(images) == 0 for images in rows):
        raise ValueError("Every row of `rows` must hold at least one image; drop empty rows.")
    included = [None] * len(rows) if included is None else included
    if len(included) != len(rows):
        raise ValueError(f"`included` must have one entry per row ({len(rows)}), got {len(included)}.")
    lines = []
    for images, probs, mask in zip(rows, probabilities, included):
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        tiles = []
        for j in range(len(pixels)):
            if mask is not None and not bool(mask[j]):
                bars = [None] * len(probs)
            else:
                bars = [(int(p[j].argmax()), float(p[j].max())) for p in probs.values()]
            tiles.append(annotated_tile(pixels[j].numpy(), bars))
        gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
        lines.append(np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1))
    if len({line.shape for line in lines}) != 1:
        raise ValueError("Every row of `rows` must hold the same number of images of the same size.")
    spacer = np.full((6, lines[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([x for line in lines for x in (line, spacer)][:-1], axis=0)
