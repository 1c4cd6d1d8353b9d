"""The distributional alignment loss (DAL, paper Sec. 4.1, Eq. 4-6) and the expected optimal-transport targets."""

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln
from scipy.stats import binom
from torch import nn

from .target_distribution import TargetDistribution

# `method="auto"` enumerates the class-count vectors exactly when there are at most this many of them (about 0.1 s
# for 32 images and 4 classes); beyond it, it uses Monte Carlo.
AUTO_EXACT_MAX_COUNT_VECTORS = 10_000
# `method="exact"` refuses more count vectors than this (one assignment each; minutes of CPU time).
EXACT_MAX_COUNT_VECTORS = 1_000_000
# Count vectors whose multinomial probability is below this are skipped by the exact method; their total mass is at
# most (number of count vectors) x this, far below float32 resolution of the returned targets.
_NEGLIGIBLE_PROBABILITY = 1e-15
_METHODS = ("auto", "exact", "monte_carlo", "fixed")


def _transport_costs(probs: np.ndarray) -> np.ndarray:
    # |p_i - e_k|_2 = sqrt(|p_i|^2 - 2 p_ik + 1): the paper's Eq. 4 cost, the L2 norm (not squared). For K > 2 the
    # square root changes which permutation is optimal, so it is kept.
    sq = (probs**2).sum(axis=1, keepdims=True) - 2.0 * probs + 1.0
    return np.sqrt(np.clip(sq, 0.0, None))


def _assign(costs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Optimal transport of N images onto `counts[k]` one-hot copies of class k: the class of each image, (N,)."""
    slots = np.repeat(np.arange(costs.shape[1]), counts)
    rows, cols = linear_sum_assignment(costs[:, slots])
    classes = np.empty(costs.shape[0], dtype=np.int64)
    classes[rows] = slots[cols]
    return classes


def _count_vectors(n: int, k: int):
    """All vectors of `k` non-negative integers summing to `n` (stars and bars), as an (M, k) array."""
    bars = np.array(list(itertools.combinations(range(n + k - 1), k - 1)), dtype=np.int64).reshape(-1, k - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), n + k - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


def _largest_remainder_counts(n: int, target: np.ndarray) -> np.ndarray:
    """Integer class counts summing to `n` closest to `n * target` (Hamilton's largest-remainder rounding)."""
    raw = n * target
    counts = np.floor(raw).astype(np.int64)
    remainder = raw - counts
    # Ties go to the lower class index (stable sort) so the result is deterministic.
    for k in np.argsort(-remainder, kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    return counts


def _average_ties(probs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each group of identical probability rows gets its mean target row.

    Tied rows make the optimal transport ambiguous (the solver breaks ties by position); the mean over the tied rows is
    the expectation under uniformly random tie-breaking, and keeps the targets permutation-equivariant.
    """
    _, inverse = np.unique(probs, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((inverse.max() + 1, q.shape[1]))
    np.add.at(sums, inverse, q)
    return (sums / np.bincount(inverse)[:, None])[inverse]


def _exact_two_classes(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    # For K = 2 the cost |p_i - e_0|_2 = sqrt(2) (1 - p_i0) is linear in p_i0, so with n_0 slots of class 0 every
    # optimal transport gives class 0 to the n_0 images of largest p_i0. The image of rank r (0-based, descending)
    # therefore gets class 0 iff n_0 > r, where n_0 ~ Binomial(N, target_0): q_i0 = P(n_0 > r) = sf(r).
    n = probs.shape[0]
    order = np.argsort(-probs[:, 0], kind="stable")
    q0 = np.empty(n)
    q0[order] = binom.sf(np.arange(n), n, target[0])
    return np.stack([q0, 1.0 - q0], axis=1)


def _exact_enumeration(costs: np.ndarray, target: np.ndarray) -> np.ndarray:
    # The iid one-hot samples u_1..u_N enter the transport only through their class counts n ~ Multinomial(N, target),
    # and the transport of a given count vector does not depend on the order of the samples. Hence
    # E[u_sigma*(i)] = sum_n P(n) onehot(class assigned to i under n): one assignment per count vector.
    n, k = costs.shape
    counts = _count_vectors(n, k)
    with np.errstate(divide="ignore"):
        log_target = np.log(target)
    log_pmf = gammaln(n + 1) - gammaln(counts + 1).sum(axis=1) + np.where(counts > 0, counts * log_target, 0.0).sum(1)
    pmf = np.exp(log_pmf)
    q = np.zeros((n, k))
    rows = np.arange(n)
    for count, weight in zip(counts, pmf):
        if weight < _NEGLIGIBLE_PROBABILITY:
            continue
        q[rows, _assign(costs, count)] += weight
    return q / q.sum(axis=1, keepdims=True)


def _num_count_vectors(n: int, k: int) -> int:
    return math.comb(n + k - 1, k - 1)


def _numpy_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


def expected_ot_targets(
    probs: torch.Tensor,
    target_probs: torch.Tensor,
    method: str = "auto",
    num_samples: int = 100,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    r"""
    The expected optimal transport from a batch's class probabilities to i.i.d. samples of the target (paper Eq. 5).

    For one-hot samples `u_1..u_N ~ target_probs`, `sigma*` is the permutation minimising `sum_i |p_i - u_sigma(i)|_2`
    (the L2 norm, not its square) and the result is `q_i = E[u_sigma*(i)]`: the probability that image `i` should be
    of class `k` had the batch followed the target.

    Args:
        probs (`torch.Tensor` of shape `(N, K)`):
            Class probabilities of `N` images (rows non-negative, summing to 1). No gradient flows through the result.
        target_probs (`torch.Tensor` or sequence of shape `(K,)`):
            The target distribution over the `K` classes (non-negative, summing to 1).
        method (`str`, *optional*, defaults to `"auto"`):
            `"exact"`: for `K = 2`, sorting is optimal and the class count is binomial (closed form, any `N`); for
            larger `K`, one assignment per multinomial count vector (feasible while `C(N + K - 1, K - 1)` is small).
            `"monte_carlo"`: the average over `num_samples` sampled count vectors, each solved with
            `scipy.optimize.linear_sum_assignment`. `"fixed"`: the paper's fixed-sample variant, a single transport
            onto the counts `round(N * target_probs)` (one-hot rows; a stronger finite-sample objective).
            `"auto"`: exact when `K = 2` or there are at most 10,000 count vectors, Monte Carlo otherwise.
            Except for `"fixed"`, identical rows of `probs` get identical targets (their mean: the expectation under
            random tie-breaking), so the result does not depend on the images' order.
        num_samples (`int`, *optional*, defaults to 100):
            Number of sampled count vectors for `"monte_carlo"`.
        generator (`torch.Generator` or `int`, *optional*):
            Seeds the Monte Carlo samples (an `int` is a seed); `None` uses torch's global random state.

    Returns:
        `torch.Tensor` of shape `(N, K)`, rows summing to 1, on `probs`' device, in its floating dtype.
    """
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    probs_t = torch.as_tensor(probs)
    if probs_t.ndim != 2 or probs_t.shape[1] < 1:
        raise ValueError(f"`probs` must have shape (N, K), got {tuple(probs_t.shape)}.")
    out_dtype = probs_t.dtype if probs_t.is_floating_point() else torch.float32
    p = probs_t.detach().to("cpu", torch.float64).numpy()
    target = torch.as_tensor(target_probs, dtype=torch.float64).flatten().numpy()
    n, k = p.shape
    if target.shape[0] != k:
        raise ValueError(f"`target_probs` has {target.shape[0]} classes but `probs` has {k}; give one per column.")
    # NaN compares False with everything, so the range checks below would let it through.
    if not np.isfinite(target).all():
        raise ValueError(f"`target_probs` must be finite, got {target.tolist()}.")
    if (target < 0).any() or abs(target.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"`target_probs` must be non-negative and sum to 1, got {target.tolist()} (sum {target.sum():.12g})."
        )
    if not np.isfinite(p).all():
        raise ValueError("`probs` must be finite, but it holds NaN or infinite values; check the classifier's logits.")
    if n and ((p < -1e-6).any() or np.abs(p.sum(axis=1) - 1.0).max() > 1e-3):
        raise ValueError(
            "`probs` rows must be probability vectors (non-negative, summing to 1); apply a softmax first."
        )
    q = np.zeros((n, k))
    if n == 0:
        return torch.as_tensor(q, dtype=out_dtype, device=probs_t.device)

    # Classes with zero target probability never receive a sample: drop them from the transport.
    support = np.flatnonzero(target > 0)
    sub_target = target[support] / target[support].sum()
    costs = _transport_costs(p)[:, support]
    num_vectors = _num_count_vectors(n, len(support))
    if method == "auto":
        method = "exact" if len(support) <= 2 or num_vectors <= AUTO_EXACT_MAX_COUNT_VECTORS else "monte_carlo"

    if len(support) == 1:
        sub_q = np.ones((n, 1))
    elif method == "fixed":
        sub_q = np.zeros((n, len(support)))
        sub_q[np.arange(n), _assign(costs, _largest_remainder_counts(n, sub_target))] = 1.0
    elif method == "exact" and len(support) == 2:
        # Probabilities restricted to the support, renormalised, keep the ranking of the cost difference only when
        # the dropped classes are empty; use the general enumeration otherwise (N + 1 assignments, still cheap).
        if len(support) == k:
            sub_q = _exact_two_classes(p, sub_target)
        else:
            sub_q = _exact_enumeration(costs, sub_target)
    elif method == "exact":
        if num_vectors > EXACT_MAX_COUNT_VECTORS:
            raise ValueError(
                f"`method='exact'` would solve {num_vectors:,} assignments for N={n} images and {len(support)} "
                f"classes; use `method='monte_carlo'` (or 'auto')."
            )
        sub_q = _exact_enumeration(costs, sub_target)
    else:
        rng = _numpy_generator(generator)
        draws = torch.multinomial(torch.as_tensor(sub_target), n * num_samples, replacement=True, generator=rng)
        counts = np.stack([np.bincount(row, minlength=len(support)) for row in draws.view(num_samples, n).numpy()])
        sub_q = np.zeros((n, len(support)))
        rows = np.arange(n)
        # Many samples share a count vector: solve each distinct one once.
        unique, multiplicity = np.unique(counts, axis=0, return_counts=True)
        for count, times in zip(unique, multiplicity):
            sub_q[rows, _assign(costs, count)] += times
        sub_q /= num_samples
    if method != "fixed":
        sub_q = _average_ties(p, sub_q)
    q[:, support] = sub_q
    return torch.as_tensor(q, dtype=out_dtype, device=probs_t.device)


@dataclass
class DistributionalAlignmentOutput:
    r"""
    Diagnostics of one [`DistributionalAlignmentLoss`] call, for logging.

    Args:
        loss (`torch.Tensor`, scalar): The total loss (sum over factors).
        factor_losses (`dict[str, torch.Tensor]`): Each factor's loss (scalar), keyed by the factor's name.
        targets (`dict[str, torch.Tensor]`): Attribute -> target class index `y_i` of each image, `(N,)`, `-1` for
            images excluded by the mask.
        expected_targets (`dict[str, torch.Tensor]`): Factor -> `q`, `(N, num_cells)`, zero rows for excluded images.
        confidences (`dict[str, torch.Tensor]`): Factor -> `c_i = max_k q_ik`, `(N,)`, 0 for excluded images.
        confident (`dict[str, torch.Tensor]`): Factor -> `(N,)` bool, images whose loss term is on (`c_i >= C`).
        mask (`torch.Tensor`): `(N,)` bool, images with a usable face (included in the transport and the loss).
        num_excluded (`int`): Images excluded by the mask.
        batch_frequencies (`dict[str, torch.Tensor]`): Attribute -> `(K,)` frequency of the classifier's argmax
            classes over the included images (the batch's current distribution; zeros when none is included).
        target_frequencies (`dict[str, torch.Tensor]`): Attribute -> `(K,)` frequency of the target classes `y_i`.
        classes (`dict[str, list[str]]`): Attribute -> class names (column order of the tensors above).
    """

    loss: torch.Tensor
    factor_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    expected_targets: dict[str, torch.Tensor] = field(default_factory=dict)
    confidences: dict[str, torch.Tensor] = field(default_factory=dict)
    confident: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    num_excluded: int = 0
    batch_frequencies: dict[str, torch.Tensor] = field(default_factory=dict)
    target_frequencies: dict[str, torch.Tensor] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)

    def to_log_dict(self) -> dict[str, float]:
        """Flat `name -> float` scalars for a tracker (loss, per-factor loss and confident share, frequencies)."""
        logs = {"dal/loss": float(self.loss), "dal/num_excluded": float(self.num_excluded)}
        for name, value in self.factor_losses.items():
            logs[f"dal/{name}/loss"] = float(value)
            logs[f"dal/{name}/confident_fraction"] = float(self.confident[name].float().mean())
        for attribute, freqs in self.batch_frequencies.items():
            for class_name, value, target in zip(
                self.classes[attribute], freqs.tolist(), self.target_frequencies[attribute].tolist()
            ):
                logs[f"dal/{attribute}/freq/{class_name}"] = value
                logs[f"dal/{attribute}/target_freq/{class_name}"] = target
        return logs


def _joint_log_probs(log_probs: Mapping[str, torch.Tensor], attributes: Sequence[str]) -> torch.Tensor:
    """Log-probabilities of the joint cells of `attributes` (row-major), from independent per-attribute heads."""
    joint = log_probs[attributes[0]]
    for attribute in attributes[1:]:
        joint = (joint[:, :, None] + log_probs[attribute][:, None, :]).reshape(joint.shape[0], -1)
    return joint


class DistributionalAlignmentLoss(nn.Module):
    r"""
    The distributional alignment loss (paper Eq. 4-6): cross-entropy towards dynamically generated target classes.

    For each factor of the target (see [`TargetDistribution`]), the classifier's joint class probabilities of the
    included images are transported onto i.i.d. samples of the target ([`expected_ot_targets`]); image `i` gets the
    target cell `y_i = argmax q_i` with confidence `c_i = max q_i`, and the factor's loss is
    `1/N sum_i 1[c_i >= C] CE(joint logits_i, y_i)`. `N` counts every image of the batch, as in Eq. 6: an image
    without a usable face contributes 0, like one below the threshold. A joint factor's cross-entropy is the sum of
    the per-attribute cross-entropies, `-log p(y_gender) - log p(y_race)` (the joint probability is the product of
    the heads' softmaxes). A conditional factor (`"age|gender,race"`) transports separately within each cell of the
    conditioning attributes' *target* classes (from the earlier factor), so each target cell gets the conditional
    distribution. The total loss is the sum over factors.

    Args:
        target_distribution (`TargetDistribution` or `str`):
            The target; a string is parsed with `TargetDistribution.from_string`.
        confidence_threshold (`float`, *optional*, defaults to 0.8):
            `C` in Eq. 6, in `[0, 1]`; the paper used 0.8 (gender, race), 0.6 (gender x race), 0.7 (with age).
        classifier_attributes (`dict[str, list[str]]`, *optional*):
            The classifier's `.attributes`; the target is checked against and reordered to them.
        method (`str`, *optional*, defaults to `"auto"`): See [`expected_ot_targets`].
        num_samples (`int`, *optional*, defaults to 100): Monte Carlo samples, see [`expected_ot_targets`].
        seed (`int`, *optional*): Seeds the Monte Carlo sampling (reproducible across calls of a fresh loss).
    """

    def __init__(
        self,
        target_distribution: TargetDistribution | str,
        confidence_threshold: float = 0.8,
        classifier_attributes: Mapping[str, list[str]] | None = None,
        method: str = "auto",
        num_samples: int = 100,
        seed: int | None = None,
    ):
        super().__init__()
        if isinstance(target_distribution, str):
            target_distribution = TargetDistribution.from_string(target_distribution, attributes=classifier_attributes)
        if not isinstance(target_distribution, TargetDistribution):
            raise ValueError(
                "`target_distribution` must be a TargetDistribution or a spec string, got "
                f"{type(target_distribution).__name__}."
            )
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"`confidence_threshold` must be in [0, 1], got {confidence_threshold}.")
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
        if classifier_attributes is not None:
            target_distribution = target_distribution.align_to(classifier_attributes)
        self.target_distribution = target_distribution
        self.confidence_threshold = confidence_threshold
        self.method = method
        self.num_samples = num_samples
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def forward(
        self,
        logits: Mapping[str, torch.Tensor] | torch.Tensor,
        mask: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        process_index: int = 0,
    ) -> tuple[torch.Tensor, DistributionalAlignmentOutput]:
        r"""
        Args:
            logits (`dict[str, torch.Tensor]` or `torch.Tensor`):
                Attribute -> logits `(N, K)` in the target's class order (an [`AttributeClassifier`]'s output); a
                single tensor when the target has one attribute.
            mask (`torch.Tensor` of shape `(N,)`, *optional*):
                `True` for images with a usable face; the others are excluded from the transport and the loss.
            gather (`Callable[[torch.Tensor], torch.Tensor]`, *optional*):
                For data-parallel training (e.g. `accelerator.gather`): concatenates a tensor over the processes in
                process order. The DAL is a batch statistic, so the transport then runs on the class probabilities of
                every process's images and each process applies the loss to its own `N` images (normalised by its
                own `N`, which data-parallel gradient averaging turns into the global mean). The diagnostics describe
                the gathered batch.
            process_index (`int`, *optional*, defaults to 0):
                This process's rank: its images are rows `[process_index * N, (process_index + 1) * N)` of the
                gathered batch (every process must pass the same `N`).

        Returns:
            `(loss, diagnostics)`: the scalar loss (differentiable w.r.t. `logits`) and a
            [`DistributionalAlignmentOutput`].
        """
        attributes = self.target_distribution.attributes
        if isinstance(logits, torch.Tensor):
            if len(attributes) != 1:
                raise ValueError(
                    f"`logits` is a single tensor but the target aligns {sorted(attributes)}; pass a dict "
                    "attribute -> logits."
                )
            logits = {next(iter(attributes)): logits}
        missing = [a for a in attributes if a not in logits]
        if missing:
            raise ValueError(
                f"`logits` has no entry for {missing}; the classifier must predict every target attribute."
            )
        n = None
        for name in attributes:
            value = logits[name]
            if value.ndim != 2 or value.shape[1] != len(attributes[name]) or (n is not None and value.shape[0] != n):
                raise ValueError(
                    f"`logits[{name!r}]` must have shape (N, {len(attributes[name])}) with the same N for every "
                    f"attribute, got {tuple(value.shape)}."
                )
            n = value.shape[0]
        device = logits[next(iter(attributes))].device
        if mask is None:
            mask = torch.ones(n, dtype=torch.bool, device=device)
        mask = torch.as_tensor(mask, device=device)
        if mask.dtype != torch.bool:  # a float mask of face scores would silently count 0.2 as a face
            raise ValueError(f"`mask` must be a boolean tensor (True: the image counts), got dtype {mask.dtype}.")
        if mask.shape != (n,):
            raise ValueError(f"`mask` must have shape (N,) = ({n},), got {tuple(mask.shape)}.")

        # Half-precision logits are upcast (fp16 log-softmax loses the small probabilities); fp64 stays fp64.
        log_probs = {
            a: torch.log_softmax(logits[a].to(torch.promote_types(logits[a].dtype, torch.float32)), dim=-1)
            for a in attributes
        }
        local_rows = slice(0, n)
        batch_log_probs = log_probs
        if gather is not None:
            # The transport sees every process's images; the cross-entropy only this process's own rows.
            batch_log_probs = {a: gather(v.detach().contiguous()) for a, v in log_probs.items()}
            mask = gather(mask.contiguous())
            local_rows = slice(process_index * n, (process_index + 1) * n)
            if mask.shape[0] < local_rows.stop:
                raise ValueError(
                    f"`process_index` {process_index} is out of range for a gathered batch of {mask.shape[0]} images "
                    f"of {n} per process."
                )
        num_local, n = n, mask.shape[0]
        out = DistributionalAlignmentOutput(loss=torch.zeros((), device=device), mask=mask, classes=attributes)
        out.num_excluded = int((~mask).sum())
        total = torch.zeros((), device=device)
        for factor in self.target_distribution.factors:
            joint = _joint_log_probs(batch_log_probs, factor.attributes)
            local_joint = joint if gather is None else _joint_log_probs(log_probs, factor.attributes)
            probs = joint.detach().exp()
            # Rows with non-finite logits (a diverged or overflowing step) get uniform probabilities for the transport
            # only: their log-probabilities stay NaN, so the step's gradient is not finite, which training loops skip
            # and report (as `examples/train_fair_lora.py` does), instead of stopping the run.
            finite = torch.isfinite(probs).all(dim=1, keepdim=True)
            probs = torch.where(finite, probs, torch.full_like(probs, 1.0 / probs.shape[1]))
            q = torch.zeros_like(probs)
            if factor.given:
                row = torch.zeros(n, dtype=torch.long, device=device)
                for attribute, classes in zip(factor.given, factor.given_classes):
                    row = row * len(classes) + out.targets[attribute].clamp(min=0)
                groups = [(mask & (row == r), factor.probabilities[r]) for r in range(factor.probabilities.shape[0])]
            else:
                groups = [(mask, factor.probabilities[0])]
            for members, target in groups:
                if members.any():
                    q[members] = expected_ot_targets(
                        probs[members], target, self.method, self.num_samples, self.generator
                    ).to(q.dtype)
            confidence, cell = q.max(dim=1)
            confidence = torch.where(mask, confidence, torch.zeros_like(confidence))
            confident = mask & (confidence >= self.confidence_threshold)
            cross_entropy = -local_joint.gather(1, cell[local_rows, None]).squeeze(1)
            factor_loss = (
                torch.where(confident[local_rows], cross_entropy, torch.zeros_like(cross_entropy)).sum() / num_local
            )
            total = total + factor_loss
            out.factor_losses[factor.name] = factor_loss.detach()
            out.expected_targets[factor.name] = q
            out.confidences[factor.name] = confidence
            out.confident[factor.name] = confident
            remaining = cell.clone()
            for attribute, size in reversed(list(zip(factor.attributes, factor.shape))):
                target_class = torch.where(mask, remaining % size, torch.full_like(remaining, -1))
                out.targets[attribute] = target_class
                remaining = remaining // size
        for attribute, classes in attributes.items():
            num_included = max(int(mask.sum()), 1)
            current = batch_log_probs[attribute].argmax(dim=1)[mask]
            out.batch_frequencies[attribute] = torch.bincount(current, minlength=len(classes)).float() / num_included
            chosen = out.targets[attribute][mask]
            out.target_frequencies[attribute] = torch.bincount(chosen, minlength=len(classes)).float() / num_included
        out.loss = total.detach()
        return total, out
