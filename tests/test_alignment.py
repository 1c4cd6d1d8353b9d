import itertools
import math

import numpy as np
import pytest
import torch

from diffusers_fair import DistributionalAlignmentLoss, TargetDistribution, expected_ot_targets

torch.set_num_threads(1)


def _random_probs(n, k, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, k, generator=generator, dtype=torch.float64), dim=1)


def _brute_force_targets(probs, target, cost=lambda d: np.linalg.norm(d, axis=-1)):
    """Eq. 5 literally: every iid sample sequence u_1..u_N, every permutation, the optimal one's classes."""
    probs = np.asarray(probs, dtype=np.float64)
    n, k = probs.shape
    eye = np.eye(k)
    q = np.zeros((n, k))
    perms = list(itertools.permutations(range(n)))
    for sequence in itertools.product(range(k), repeat=n):
        weight = math.prod(target[c] for c in sequence)
        if weight == 0:
            continue
        best = min(perms, key=lambda perm: cost(probs - eye[[sequence[j] for j in perm]]).sum())
        q[np.arange(n), [sequence[j] for j in best]] += weight
    return q


@pytest.mark.parametrize("k, target", [(2, [0.7, 0.3]), (3, [0.5, 0.3, 0.2])])
def test_exact_matches_brute_force_over_permutations(k, target):
    probs = _random_probs(5, k, seed=k)
    expected = _brute_force_targets(probs.numpy(), target)
    torch.testing.assert_close(expected_ot_targets(probs, target, method="exact").numpy(), expected, atol=1e-9, rtol=0)


def test_l2_cost_not_squared():
    # For K > 2 the L2 norm and its square can choose different permutations; find such a batch and check we
    # follow the paper's L2 norm (fixed-sample variant: one transport onto exact counts, compared by brute force).
    squared = None
    for seed in range(200):
        probs = _random_probs(4, 3, seed=seed, scale=2.0).numpy()
        counts = [2, 1, 1]
        slots = np.repeat(np.arange(3), counts)
        eye = np.eye(3)
        perms = list(itertools.permutations(range(4)))
        l2 = min(perms, key=lambda p: np.linalg.norm(probs - eye[slots[list(p)]], axis=1).sum())
        sq = min(perms, key=lambda p: ((probs - eye[slots[list(p)]]) ** 2).sum())
        if not np.array_equal(slots[list(l2)], slots[list(sq)]):
            squared = (probs, slots[list(l2)])
            break
    assert squared is not None, "no batch where L2 and squared L2 transports differ: the check would be vacuous"
    probs, l2_classes = squared
    q = expected_ot_targets(torch.from_numpy(probs), [0.5, 0.25, 0.25], method="fixed")
    assert q.argmax(1).tolist() == l2_classes.tolist()


def test_two_class_closed_form_matches_enumeration():
    from diffusers_fair.alignment import _exact_enumeration, _transport_costs

    probs = _random_probs(30, 2, seed=3)
    closed = expected_ot_targets(probs, [0.6, 0.4], method="exact").numpy()
    enumerated = _exact_enumeration(_transport_costs(probs.numpy()), np.array([0.6, 0.4]))
    np.testing.assert_allclose(closed, enumerated, atol=1e-12)


@pytest.mark.parametrize("k, n, target", [(2, 12, [0.3, 0.7]), (3, 10, [0.5, 0.3, 0.2]), (4, 8, [0.25] * 4)])
def test_exact_and_monte_carlo_agree(k, n, target):
    probs = _random_probs(n, k, seed=k)
    num_samples = 4000
    exact = expected_ot_targets(probs, target, method="exact")
    monte_carlo = expected_ot_targets(probs, target, method="monte_carlo", num_samples=num_samples, generator=0)
    # Each entry of the Monte Carlo estimate is a mean of Bernoullis: sd <= 0.5 / sqrt(num_samples).
    assert (exact - monte_carlo).abs().max() < 5 * 0.5 / math.sqrt(num_samples)
    again = expected_ot_targets(probs, target, method="monte_carlo", num_samples=num_samples, generator=0)
    torch.testing.assert_close(monte_carlo, again)


def test_auto_picks_exact_then_monte_carlo():
    small = _random_probs(8, 4, seed=0)
    torch.testing.assert_close(expected_ot_targets(small, [0.25] * 4), expected_ot_targets(small, [0.25] * 4, "exact"))
    # 60 images over 4 classes: 39,711 count vectors, beyond the auto limit -> Monte Carlo (seeded, reproducible).
    large = _random_probs(60, 4, seed=0)
    auto = expected_ot_targets(large, [0.25] * 4, generator=1)
    torch.testing.assert_close(auto, expected_ot_targets(large, [0.25] * 4, "monte_carlo", generator=1))


@pytest.mark.parametrize("method", ["exact", "monte_carlo", "fixed"])
def test_rows_are_distributions_and_permutation_equivariant(method):
    probs = _random_probs(9, 3, seed=5).float()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    q = expected_ot_targets(probs, [0.4, 0.4, 0.2], method=method, generator=0)
    q_perm = expected_ot_targets(probs[perm], [0.4, 0.4, 0.2], method=method, generator=0)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.sum(1), torch.ones(9))
    torch.testing.assert_close(q_perm, q[perm])


@pytest.mark.parametrize("method", ["exact", "monte_carlo"])
def test_ties_get_the_same_targets_for_any_number_of_classes(method):
    # Four identical images: which of them the transport sends where is the solver's arbitrary tie-break, so each
    # must get the mean (the same row), not a confident target of its own (0.91 for one, 0.10 for another before).
    probs = torch.tensor([[1.0, 0.0, 0.0]] * 4 + [[0.1, 0.1, 0.8]], dtype=torch.float64)
    target = [1 / 3, 1 / 3, 1 / 3]
    q = expected_ot_targets(probs, target, method=method, generator=0)
    for i in range(1, 4):
        torch.testing.assert_close(q[i], q[0])
    perm = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(expected_ot_targets(probs[perm], target, method=method, generator=0), q[perm])
    if method == "exact":  # the tied rows share the brute force's total mass
        expected = _brute_force_targets(probs.numpy(), target)
        torch.testing.assert_close(q[:4].sum(0).numpy(), expected[:4].sum(0), atol=1e-9, rtol=0)
        torch.testing.assert_close(q[4].numpy(), expected[4], atol=1e-9, rtol=0)


def test_two_class_ties_are_averaged():
    probs = torch.tensor([[0.6, 0.4]] * 3 + [[0.2, 0.8]])
    q = expected_ot_targets(probs, [0.5, 0.5])
    torch.testing.assert_close(q[0], q[1])
    torch.testing.assert_close(q[0], q[2])
    assert q[3, 1] > q[0, 1]


def test_zero_probability_class_never_targeted():
    probs = _random_probs(7, 3, seed=1)
    for method in ["exact", "monte_carlo", "fixed"]:
        q = expected_ot_targets(probs, [0.5, 0.0, 0.5], method=method, generator=0)
        assert (q[:, 1] == 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 4])
def test_batch_matching_target_keeps_its_classes(k):
    classes = torch.arange(16) % k
    probs = torch.full((16, k), 0.05 / (k - 1)).scatter(1, classes[:, None], 0.95)
    for method in ["auto", "fixed"]:
        q = expected_ot_targets(probs, [1 / k] * k, method=method)
        assert (q.argmax(1) == classes).all()


def test_non_uniform_target_on_near_uniform_batch():
    probs = _random_probs(100, 2, seed=0, scale=0.05)
    q = expected_ot_targets(probs, [0.75, 0.25])
    num_old = int((q.argmax(1) == 1).sum())
    assert abs(num_old - 25) <= 2
    # The images sent to "old" are the ones the classifier finds oldest.
    assert set(q[:, 1].argsort(descending=True)[:num_old].tolist()) == set(
        probs[:, 1].argsort(descending=True)[:num_old].tolist()
    )
    fixed = expected_ot_targets(probs, [0.75, 0.25], method="fixed")
    assert int(fixed[:, 1].sum()) == 25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "sinkhorn"}, "`method` must be one of"),
        ({"num_samples": 0}, "`num_samples` must be a positive integer"),
        ({"target_probs": [0.5, 0.3, 0.2]}, "has 3 classes but `probs` has 2"),
        ({"target_probs": [0.7, 0.7]}, "sum to 1"),
        ({"probs": torch.ones(4)}, r"must have shape \(N, K\)"),
        ({"probs": torch.ones(4, 2)}, "apply a softmax first"),
        ({"probs": torch.full((40, 6), 1 / 6), "target_probs": [1 / 6] * 6, "method": "exact"}, "assignments"),
    ],
)
def test_expected_ot_targets_errors(kwargs, match):
    arguments = {"probs": torch.full((4, 2), 0.5), "target_probs": [0.5, 0.5], **kwargs}
    with pytest.raises(ValueError, match=match):
        expected_ot_targets(**arguments)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"probs": torch.tensor([[0.5, 0.5], [float("nan"), 0.5]])}, "`probs` must be finite"),
        ({"probs": torch.tensor([[0.5, 0.5], [float("inf"), 0.0]])}, "`probs` must be finite"),
        ({"target_probs": [float("nan"), float("nan")]}, "`target_probs` must be finite"),
        ({"target_probs": [float("nan"), 1.0]}, "`target_probs` must be finite"),
        ({"target_probs": [0.5, 0.500002]}, r"sum 1\.000002\)"),
    ],
)
def test_expected_ot_targets_refuses_non_finite_values(kwargs, match):
    arguments = {"probs": torch.full((2, 2), 0.5), "target_probs": [0.5, 0.5], **kwargs}
    with pytest.raises(ValueError, match=match):
        expected_ot_targets(**arguments)


def _manual_loss(logits, q, threshold):
    confidence, target = q.max(1)
    cross_entropy = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return (cross_entropy * (confidence >= threshold)).sum() / logits.shape[0]


@pytest.mark.parametrize("threshold", [0.0, 0.7, 0.95, 1.0])
def test_loss_matches_equation_6_and_threshold_masks(threshold):
    logits = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss_fn = DistributionalAlignmentLoss("gender=uniform", confidence_threshold=threshold)
    loss, out = loss_fn(logits)
    q = expected_ot_targets(torch.softmax(logits, 1), [0.5, 0.5])
    torch.testing.assert_close(loss, _manual_loss(logits, q, threshold))
    assert out.confident["gender"].tolist() == (q.max(1).values >= threshold).tolist()
    if threshold == 1.0:
        assert loss == 0


def test_gradient_matches_finite_differences():
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    loss_fn = DistributionalAlignmentLoss("g=a:0.5,b:0.3,c:0.2", confidence_threshold=0.3, method="exact")
    # The targets are piecewise constant in the logits, so away from their switching points finite differences
    # see the cross-entropy towards fixed targets.
    assert torch.autograd.gradcheck(lambda x: loss_fn(x)[0], (logits,), eps=1e-6, atol=1e-6)


def test_mask_excludes_images_from_transport_and_loss():
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mask = torch.tensor([True, False] * 6)
    loss_fn = DistributionalAlignmentLoss("gender=uniform", confidence_threshold=0.5)
    loss, out = loss_fn({"gender": logits}, mask=mask)
    loss.backward()
    assert out.num_excluded == 6
    assert (out.targets["gender"][~mask] == -1).all() and (out.confidences["gender"][~mask] == 0).all()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).any()
    q_included = expected_ot_targets(torch.softmax(logits[mask].detach(), 1), [0.5, 0.5])
    torch.testing.assert_close(out.expected_targets["gender"][mask], q_included)
    # Eq. 6 divides by the whole batch: excluded images count as zero terms.
    torch.testing.assert_close(loss, _manual_loss(logits[mask], q_included, 0.5) * 6 / 12)
    assert out.batch_frequencies["gender"].sum() == pytest.approx(1.0)


def test_joint_factor_cross_entropy_is_sum_of_heads():
    generator = torch.Generator().manual_seed(3)
    logits = {"gender": torch.randn(16, 2, generator=generator), "race": torch.randn(16, 4, generator=generator)}
    loss, out = DistributionalAlignmentLoss("gender,race=uniform", confidence_threshold=0.0, seed=0)(logits)
    y_gender, y_race = out.targets["gender"], out.targets["race"]
    expected = (
        torch.nn.functional.cross_entropy(logits["gender"], y_gender, reduction="sum")
        + torch.nn.functional.cross_entropy(logits["race"], y_race, reduction="sum")
    ) / 16
    torch.testing.assert_close(loss, expected)
    assert out.expected_targets["gender,race"].shape == (16, 8)
    assert set(out.to_log_dict()) >= {"dal/loss", "dal/gender,race/loss", "dal/race/freq/Asian"}


def test_conditional_targets_keep_proportions_within_each_cell():
    # 40 images: confident gender (20 / 20); age predictions correlated with gender (men look older), so an
    # unconditional 75/25 age target would make the old images mostly men.
    n = 40
    gender = torch.arange(n) % 2
    gender_logits = torch.nn.functional.one_hot(gender, 2).float() * 8.0
    age_noise = torch.rand(n, generator=torch.Generator().manual_seed(0))
    age_logits = torch.stack([torch.zeros(n), (1 - gender) * 2.0 + age_noise], dim=1)
    logits = {"gender": gender_logits, "age": age_logits}

    _, unconditional = DistributionalAlignmentLoss("gender=uniform;age=young:0.75,old:0.25")(logits)
    old_unconditional = unconditional.targets["age"] == 1
    assert old_unconditional[gender == 0].sum() == 10 and old_unconditional[gender == 1].sum() == 0

    _, conditional = DistributionalAlignmentLoss("gender=uniform;age|gender=young:0.75,old:0.25")(logits)
    assert (conditional.targets["gender"] == gender).all()
    old = conditional.targets["age"] == 1
    for cell in (0, 1):
        assert abs(int(old[gender == cell].sum()) - 5) <= 1


def _descend(spec, logits, steps, lr, threshold=0.6):
    loss_fn = DistributionalAlignmentLoss(spec, confidence_threshold=threshold, seed=0)
    logits = logits.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([logits], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss, out = loss_fn(logits)
        loss.backward()
        optimizer.step()
    return logits.detach(), out


@pytest.mark.parametrize("spec, target", [("g=a,b", [0.5, 0.5]), ("g=a:0.75,b:0.25", [0.75, 0.25])])
def test_gradient_descent_drives_frequencies_to_target(spec, target):
    n = 60
    generator = torch.Generator().manual_seed(0)
    # 90% of the images start as class b.
    logits = torch.stack([torch.zeros(n), 2.0 + torch.randn(n, generator=generator)], dim=1)
    logits[: n // 10, 1] = -2.0
    initial = torch.bincount(logits.argmax(1), minlength=2) / n
    final_logits, _ = _descend(spec, logits, steps=30, lr=20.0)
    final = torch.bincount(final_logits.argmax(1), minlength=2) / n
    assert abs(final[0] - target[0]) < abs(initial[0] - target[0])
    assert abs(final[0] - target[0]) <= 0.05


def test_gradient_descent_fixed_point_when_batch_matches_target():
    classes = torch.arange(40) % 4
    logits = torch.nn.functional.one_hot(classes, 4).float() * 3.0
    final_logits, out = _descend("race=uniform", logits, steps=20, lr=5.0)
    assert (final_logits.argmax(1) == classes).all()
    assert (out.targets["race"] == classes).all()
    # Confidence in the own class only grows.
    assert (torch.softmax(final_logits, 1).max(1).values >= torch.softmax(logits, 1).max(1).values).all()


def test_dal_errors():
    with pytest.raises(ValueError, match="`confidence_threshold` must be in"):
        DistributionalAlignmentLoss("gender=uniform", confidence_threshold=1.5)
    with pytest.raises(ValueError, match="`method` must be one of"):
        DistributionalAlignmentLoss("gender=uniform", method="greedy")
    with pytest.raises(ValueError, match="`num_samples` must be a positive integer"):
        DistributionalAlignmentLoss("gender=uniform", num_samples=-1)
    with pytest.raises(ValueError, match="must be a TargetDistribution"):
        DistributionalAlignmentLoss({"gender": "uniform"})
    with pytest.raises(ValueError, match="classifier has no such head"):
        DistributionalAlignmentLoss("age=uniform", classifier_attributes={"gender": ["male", "female"]})
    loss_fn = DistributionalAlignmentLoss(TargetDistribution.from_string("gender=uniform;age=uniform"))
    with pytest.raises(ValueError, match="pass a dict"):
        loss_fn(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"no entry for \['age'\]"):
        loss_fn({"gender": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match=r"must have shape \(N, 2\)"):
        loss_fn({"gender": torch.zeros(4, 2), "age": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="`mask` must have shape"):
        loss_fn({"gender": torch.zeros(4, 2), "age": torch.zeros(4, 2)}, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="`mask` must be a boolean tensor"):  # face scores are not a mask
        loss_fn({"gender": torch.zeros(4, 2), "age": torch.zeros(4, 2)}, mask=torch.tensor([0.2, 0.0, 0.9, 0.0]))


@pytest.mark.parametrize("spec", ["gender=uniform", "gender,race=uniform;age|gender,race=young:0.75,old:0.25"])
def test_gathered_batch_aligns_like_one_batch(spec):
    # Two "processes" of 6 images each, with a gather that concatenates their logits in process order, must get the
    # single-process targets of the 12 images, and their losses must average to the single-process loss.
    attributes = {"gender": ["male", "female"], "race": ["WMELH", "Asian", "Black", "Indian"], "age": ["young", "old"]}
    torch.manual_seed(0)
    logits = {a: torch.randn(12, len(c), dtype=torch.float64) * 2 for a, c in attributes.items()}
    mask = torch.ones(12, dtype=torch.bool)
    mask[3] = False

    def make_loss():  # a fresh, seeded loss per call: the joint factor's transport is Monte Carlo (8 cells)
        return DistributionalAlignmentLoss(spec, confidence_threshold=0.5, classifier_attributes=attributes, seed=0)

    loss_fn = make_loss()
    full_loss, full = loss_fn(logits, mask)

    halves = [{a: v[i * 6 : (i + 1) * 6].clone().requires_grad_() for a, v in logits.items()} for i in range(2)]
    masks = [mask[:6], mask[6:]]
    losses = []
    for rank in range(2):
        other = 1 - rank
        # the loss gathers each attribute's log-probabilities (in the target's attribute order), then the mask
        calls = iter([*loss_fn.target_distribution.attributes, "mask"])

        def gather(tensor, rank=rank, other=other, calls=calls):
            name = next(calls)
            peer = masks[other] if name == "mask" else torch.log_softmax(halves[other][name].detach(), dim=-1)
            parts = {rank: tensor, other: peer}
            return torch.cat([parts[0], parts[1]])

        loss, diagnostics = make_loss()(halves[rank], masks[rank], gather=gather, process_index=rank)
        losses.append(loss)
        for attribute in diagnostics.targets:
            assert torch.equal(diagnostics.targets[attribute], full.targets[attribute])
    torch.testing.assert_close((losses[0] + losses[1]) / 2, full_loss)
    # gradients flow to each process's own logits only
    (losses[0] + losses[1]).backward()
    assert halves[0]["gender"].grad.abs().sum() > 0 and halves[1]["gender"].grad.abs().sum() > 0


def test_gather_with_a_wrong_process_index_is_refused():
    loss_fn = DistributionalAlignmentLoss("gender=uniform", classifier_attributes={"gender": ["male", "female"]})
    logits = {"gender": torch.randn(4, 2)}
    with pytest.raises(ValueError, match="process_index"):
        loss_fn(logits, gather=lambda t: t, process_index=1)


def test_loss_on_non_finite_logits_gives_a_non_finite_gradient_not_an_error():
    # `expected_ot_targets` refuses NaN, but inside the loss a diverged step must reach the training loop, which
    # skips and reports a step whose gradient is not finite.
    dal = DistributionalAlignmentLoss(TargetDistribution.from_string("hair=short,long"), confidence_threshold=0.6)
    leaf = torch.randn(6, 2, requires_grad=True)
    nan_row = torch.ones(6, 1)
    nan_row[1] = float("nan")
    loss, _ = dal({"hair": leaf * nan_row})
    loss.backward()
    assert not torch.isfinite(leaf.grad).all()
