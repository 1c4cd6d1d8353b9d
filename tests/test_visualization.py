"""The annotated grids shared by the audit's report and the training's validation."""

import numpy as np
import pytest
import torch

from diffusers_fair.visualization import BAR, PALETTE, TILE, annotated_grid


def _rgb(hex_colour: str) -> list[int]:
    return [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]


def test_grid_layout_images_and_bars():
    torch.manual_seed(0)
    rows = [torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)]
    probabilities = [
        {"hair": torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]]), "skin": torch.softmax(torch.randn(3, 4), -1)},
        {"hair": torch.tensor([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]]), "skin": torch.softmax(torch.randn(3, 4), -1)},
    ]
    grid = annotated_grid(rows, probabilities)
    tile_height = TILE + 2 * BAR + 2
    assert grid.shape == (2 * tile_height + 6, 3 * TILE + 2 * 4, 3) and grid.dtype == np.uint8
    for r, (images, probs) in enumerate(zip(rows, probabilities)):
        for j in range(3):
            top, left = r * (tile_height + 6), j * (TILE + 4)
            # The image, nearest-neighbour upscaled 12x.
            pixels = (images[j] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            expected = pixels.repeat(TILE // 8, axis=0).repeat(TILE // 8, axis=1)
            np.testing.assert_array_equal(grid[top : top + TILE, left : left + TILE], expected)
            for k, p in enumerate(probs.values()):
                bar = grid[top + TILE + 2 + BAR * k, left : left + TILE]
                length = max(1, round(TILE * float(p[j].max())))
                assert (bar[:length] == _rgb(PALETTE[int(p[j].argmax())])).all()
                assert (bar[length:] == 225).all()


def test_grid_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same length"):
        annotated_grid([torch.rand(2, 3, 8, 8)], [])
    with pytest.raises(ValueError, match="at least one image"):
        annotated_grid([torch.rand(0, 3, 8, 8)], [{"a": torch.zeros(0, 2)}])
    with pytest.raises(ValueError, match="same number"):
        annotated_grid(
            [torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)],
            [{"a": torch.full((2, 2), 0.5)}, {"a": torch.full((3, 2), 0.5)}],
        )


def test_images_that_were_not_classified_get_empty_bars():
    torch.manual_seed(0)
    rows = [torch.rand(2, 3, 8, 8)]
    probabilities = [{"hair": torch.tensor([[0.9, 0.1], [0.2, 0.8]])}]
    grid = annotated_grid(rows, probabilities, included=[torch.tensor([False, True])])
    bar_row = TILE + 2
    assert (grid[bar_row, :TILE] == 225).all()  # no face: an empty bar, no class colour
    assert (grid[bar_row, TILE + 4 : TILE + 4 + round(TILE * 0.8)] == _rgb(PALETTE[1])).all()
    np.testing.assert_array_equal(
        annotated_grid(rows, probabilities, included=[None]), annotated_grid(rows, probabilities)
    )
    assert not np.array_equal(grid, annotated_grid(rows, probabilities))
    with pytest.raises(ValueError, match="`included` must have one entry per row"):
        annotated_grid(rows, probabilities, included=[])
