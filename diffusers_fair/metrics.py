"""Bias and similarity metrics (paper Sec. 5.1, "Evaluation")."""

import itertools

import torch


def bias_score(frequencies) -> float:
    r"""
    The paper's per-prompt bias: the mean over class pairs `i < j` of `|freq(i) - freq(j)|`.

    Args:
        frequencies (`Sequence[float]` or `torch.Tensor` of shape `(K,)`):
            Class frequencies of one attribute over the images of one prompt, `K >= 2`, summing to 1.

    Returns:
        `float` in `[0, 1]`: 0 for a uniform distribution, 1 when a binary attribute takes one class only.
    """
    freqs = torch.as_tensor(frequencies, dtype=torch.float64).flatten()
    if freqs.numel() < 2:
        raise ValueError(f"`frequencies` needs at least two classes, got {freqs.numel()}.")
    if (freqs < 0).any() or abs(float(freqs.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"`frequencies` must be non-negative and sum to 1, got {freqs.tolist()} (sum {float(freqs.sum())})."
        )
    pairs = list(itertools.combinations(range(freqs.numel()), 2))
    return float(sum(abs(freqs[i] - freqs[j]) for i, j in pairs) / len(pairs))
