"""Bias and similarity metrics (paper Sec. 5.1, "Evaluation")."""

import itertools
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _checked_probabilities(name: str, probabilities) -> torch.Tensor:
    probs = torch.as_tensor(probabilities, dtype=torch.float64).flatten()
    if probs.numel() < 2:
        raise ValueError(f"`{name}` needs at least two classes, got {probs.numel()}.")
    # NaN compares False with everything, so the range check below would let it through.
    if not torch.isfinite(probs).all():
        raise ValueError(f"`{name}` must be finite, got {probs.tolist()}.")
    if (probs < 0).any() or abs(float(probs.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"`{name}` must be non-negative and sum to 1, got {probs.tolist()} (sum {float(probs.sum()):.12g})."
        )
    return probs


def bias_score(frequencies) -> float:
    r"""
    The paper's per-prompt bias: the mean over class pairs `i < j` of `|freq(i) - freq(j)|`.

    Args:
        frequencies (`Sequence[float]` or `torch.Tensor` of shape `(K,)`):
            Class frequencies of one attribute over the images of one prompt, `K >= 2`, summing to 1.

    Returns:
        `float` in `[0, 1]`: 0 for a uniform distribution, 1 when a binary attribute takes one class only.
    """
    freqs = _checked_probabilities("frequencies", frequencies)
    pairs = list(itertools.combinations(range(freqs.numel()), 2))
    return float(sum(abs(freqs[i] - freqs[j]) for i, j in pairs) / len(pairs))


def deviation_from_target(frequencies, target_probs) -> float:
    r"""
    Total variation distance between observed class frequencies and a (possibly non-uniform) target.

    `0.5 * sum_k |freq(k) - target(k)|`; for two classes it is `|freq(old) - 0.25|` for a 75/25 age target.

    Args:
        frequencies (`Sequence[float]` or `torch.Tensor` of shape `(K,)`): Observed frequencies, summing to 1.
        target_probs (`Sequence[float]` or `torch.Tensor` of shape `(K,)`): Target probabilities, summing to 1.

    Returns:
        `float` in `[0, 1]`: 0 when the frequencies equal the target.
    """
    freqs = _checked_probabilities("frequencies", frequencies)
    target = _checked_probabilities("target_probs", target_probs)
    if freqs.shape != target.shape:
        raise ValueError(
            f"`frequencies` has {freqs.numel()} classes but `target_probs` has {target.numel()}; give one per class."
        )
    return float(0.5 * (freqs - target).abs().sum())


def _sample_counts(num_images) -> tuple[torch.Tensor, torch.Tensor]:
    """The possible counts `0..num_images` of a class among `num_images` images, and their log-factorials."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"`num_images` must be a positive integer (images per prompt), got {num_images!r}.")
    counts = torch.arange(num_images + 1, dtype=torch.float64)
    return counts, torch.lgamma(counts + 1)


def expected_bias(num_images: int, probabilities) -> float:
    r"""
    The [`bias_score`] that a model whose attribute follows `probabilities` exactly measures, on average, at
    `num_images` images per prompt: `E[bias_score(counts / num_images)]` with `counts ~ Multinomial(num_images,
    probabilities)`.

    Frequencies measured on a finite sample scatter around the model's own, so even an exactly balanced model measures
    a positive bias: 0.140 for a binary attribute at 32 images per prompt, 0.099 at 64, 0.050 at 256. A measured
    bias is to be read against this floor, not against 0. Exact (no sampling): each pair's term depends only on the
    two classes' counts, which are trinomial; `O(K^2 num_images^2)` operations.

    Args:
        num_images (`int`): Images per prompt that are classified (at least 1).
        probabilities (`Sequence[float]` or `torch.Tensor` of shape `(K,)`): The model's class probabilities, `K >= 2`,
            summing to 1 (uniform for a balanced model, the target's for a model exactly on target).

    Returns:
        `float` in `[0, 1]`.
    """
    probs = _checked_probabilities("probabilities", probabilities)
    counts, log_factorial = _sample_counts(num_images)
    n = num_images
    rows_per_chunk = max(1, 2**20 // (n + 1))
    pairs = list(itertools.combinations(range(probs.numel()), 2))
    total = 0.0
    for i, j in pairs:
        p, q = probs[i], probs[j]
        rest = (1 - p - q).clamp_min(0)
        for start in range(0, n + 1, rows_per_chunk):
            a = counts[start : start + rows_per_chunk, None]  # the count of class i
            b = counts[None, :]  # the count of class j
            c = (n - a - b).clamp_min(0)  # the other classes' count; cells with a + b > n have no mass
            log_pmf = (
                log_factorial[n]
                - log_factorial[a.long()]
                - log_factorial[b.long()]
                - log_factorial[c.long()]
                + torch.xlogy(a, p)
                + torch.xlogy(b, q)
                + torch.xlogy(c, rest)
            )
            pmf = torch.where(a + b <= n, log_pmf.exp(), 0.0)
            total += float((pmf * (a - b).abs()).sum())
    return total / (n * len(pairs))


def expected_deviation(num_images: int, target_probs) -> float:
    r"""
    The [`deviation_from_target`] that a model exactly on target measures, on average, at `num_images` images per
    prompt: `E[0.5 * sum_k |counts_k / num_images - target_k|]` with `counts ~ Multinomial(num_images, target_probs)`
    (see [`expected_bias`]). Exact: each class's count is binomial.

    Args:
        num_images (`int`): Images per prompt that are classified (at least 1).
        target_probs (`Sequence[float]` or `torch.Tensor` of shape `(K,)`):
            Target probabilities, `K >= 2`, summing to 1.

    Returns:
        `float` in `[0, 1]`.
    """
    probs = _checked_probabilities("target_probs", target_probs)
    counts, log_factorial = _sample_counts(num_images)
    n = num_images
    total = 0.0
    for p in probs:
        log_pmf = (
            log_factorial[n]
            - log_factorial
            - log_factorial.flip(0)
            + torch.xlogy(counts, p)
            + torch.xlogy(n - counts, (1 - p).clamp_min(0))
        )
        total += float((log_pmf.exp() * (counts / n - p).abs()).sum())
    return 0.5 * total


def sampling_floor(
    attributes: Mapping[str, Sequence[str]], num_images: int, target_distribution=None
) -> dict[str, float]:
    r"""
    What an ideal model measures at `num_images` images per prompt: for every group that [`score_predictions`] scores,
    `bias/<group>` of a model that follows the target's probabilities for the group ([`expected_bias`]), or is
    balanced where the target has none, and `deviation/<group>` of a model exactly on target ([`expected_deviation`]).

    Args:
        attributes (`dict[str, list[str]]`): The scored attributes and their class names.
        num_images (`int`): Images per prompt that are classified.
        target_distribution ([`TargetDistribution`], *optional*): The target; without it every group is balanced.

    Returns:
        `dict[str, float]`: metric name (as in [`score_predictions`]'s rows) -> its expected value.
    """
    floors = {}
    for name, (group_attributes, target) in _groups(attributes, target_distribution).items():
        if target is None:
            num_cells = 1
            for a in group_attributes:
                num_cells *= len(attributes[a])
            floors[f"bias/{name}"] = expected_bias(num_images, [1.0 / num_cells] * num_cells)
        else:
            floors[f"bias/{name}"] = expected_bias(num_images, target)
            floors[f"deviation/{name}"] = expected_deviation(num_images, target)
    return floors


def mean_std(values) -> tuple[float, float]:
    r"""
    Mean and standard deviation (population, `ddof=0`) of per-prompt values, as the paper's tables report them.

    Args:
        values (`Sequence[float]`): One value per prompt; NaN entries are ignored.

    Returns:
        `(mean, sd)`; `(nan, nan)` when no value is finite.
    """
    tensor = torch.as_tensor(list(values), dtype=torch.float64).flatten()
    tensor = tensor[~torch.isnan(tensor)]
    if tensor.numel() == 0:
        return float("nan"), float("nan")
    return float(tensor.mean()), float(tensor.std(unbiased=False))


def _batched(module_fn, tensors, batch_size):
    outputs = []
    for start in range(0, tensors[0].shape[0], batch_size):
        outputs.append(module_fn(*(t[start : start + batch_size] for t in tensors)))
    return outputs


def _device_of(module) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def clip_text_similarity(images: torch.Tensor, prompt: str, clip_model, tokenizer, batch_size: int = 16):
    r"""
    CLIP-T: cosine similarity between each image and its prompt.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`): Values in `[0, 1]`.
        prompt (`str`): The prompt the images were generated from.
        clip_model (`CLIPModel`): The paper evaluates with CLIP ViT-bigG/14.
        tokenizer: Its tokenizer (transformers call convention).
        batch_size (`int`, *optional*, defaults to 16): Images per encoder call.

    Returns:
        `torch.Tensor` of shape `(B,)`, values in `[-1, 1]`, on the CPU.
    """
    from .semantics import text_features

    text = F.normalize(text_features(clip_model, tokenizer, [prompt]).float(), dim=-1)[0].cpu()
    return F.normalize(image_features(images, clip_model, batch_size), dim=-1) @ text


@torch.no_grad()
def image_features(images: torch.Tensor, model, batch_size: int = 16) -> torch.Tensor:
    r"""
    The image features [`image_similarity`] compares: one row per image.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`): Values in `[0, 1]`.
        model (`CLIPModel`, `Dinov2Model` or [`~diffusers_fair.semantics.ImageFeatureExtractor`]): The encoder.
        batch_size (`int`, *optional*, defaults to 16): Images per encoder call.

    Returns:
        `torch.Tensor` of shape `(B, D)`, float32, on the CPU.
    """
    from .semantics import ImageFeatureExtractor

    extractor = model if isinstance(model, ImageFeatureExtractor) else ImageFeatureExtractor(model)
    device = _device_of(extractor)
    return torch.cat(_batched(lambda x: extractor(x.to(device)).float().cpu(), [images], batch_size))


@torch.no_grad()
def image_similarity(images: torch.Tensor, reference_images: torch.Tensor, model, batch_size: int = 16):
    r"""
    CLIP-I or DINO similarity: cosine similarity between the features of each image and of its reference (the
    original model's image for the same prompt and noise).

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`), reference_images (`torch.Tensor` of shape `(B, 3, H', W')`):
            Values in `[0, 1]`.
        model (`CLIPModel`, `Dinov2Model` or [`~diffusers_fair.semantics.ImageFeatureExtractor`]): The encoder (the
            paper evaluates with CLIP ViT-bigG/14 and DINOv2 ViT-g/14).
        batch_size (`int`, *optional*, defaults to 16): Images per encoder call.

    Returns:
        `torch.Tensor` of shape `(B,)`, values in `[-1, 1]`, on the CPU.
    """
    if images.shape[0] != reference_images.shape[0]:
        raise ValueError(
            f"`reference_images` has {reference_images.shape[0]} images but `images` has {images.shape[0]}; pair "
            f"each image with the original model's image from the same noise."
        )
    features = image_features(images, model, batch_size)
    return F.cosine_similarity(features, image_features(reference_images, model, batch_size), dim=-1)


def image_seed(seed: int, prompt: str, index: int) -> int:
    r"""
    The seed of image `index` of `prompt`: depends on nothing else (not the batch size nor the prompt's position in
    a list), so an image can be regenerated alone and a reference pipeline gets the same initial noise.

    Returns:
        `int` in `[0, 2**63)`.
    """
    import numpy as np

    state = np.random.SeedSequence([int(seed), zlib.crc32(prompt.encode("utf-8")), int(index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generate_images(
    pipeline,
    prompts: str | Sequence[str],
    num_images_per_prompt: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    seed: int = 0,
    progress_bar: bool = True,
    **pipeline_kwargs,
) -> dict[str, torch.Tensor]:
    r"""
    Generates `num_images_per_prompt` images for every prompt, batched and seeded per image.

    Image `j` of prompt `p` is drawn with its own `torch.Generator` (CPU) seeded by [`image_seed`]`(seed, p, j)`, so
    it does not depend on `batch_size`, and a frozen reference pipeline called with the same arguments gets the same
    initial noises (as CLIP-I and DINO require).

    Args:
        pipeline: Any diffusers text-to-image pipeline, called as `pipeline(prompt=..., num_images_per_prompt=...,
            num_inference_steps=..., guidance_scale=..., generator=[...], output_type="pt", **pipeline_kwargs)`
            whose `.images` are `(B, 3, H, W)` in `[0, 1]`.
        prompts (`str` or `list[str]`): The prompts.
        num_images_per_prompt (`int`): Images per prompt.
        num_inference_steps (`int`, *optional*, defaults to 25), guidance_scale (`float`, *optional*, defaults to
            7.5): Passed to the pipeline.
        batch_size (`int`, *optional*, defaults to 8): Images per pipeline call.
        seed (`int`, *optional*, defaults to 0): Base seed.
        progress_bar (`bool`, *optional*, defaults to `True`): Show a tqdm bar over images.

    Returns:
        `dict[str, torch.Tensor]`: prompt -> `(num_images_per_prompt, 3, H, W)` float32 images on the CPU.
    """
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be at least 1, got {num_images_per_prompt}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    if len(set(prompts)) != len(prompts):
        raise ValueError("`prompts` contains duplicates; each prompt's images are keyed by the prompt, list it once.")
    results = {}
    with tqdm(total=len(prompts) * num_images_per_prompt, disable=not progress_bar, desc="Generating") as bar:
        for prompt in prompts:
            chunks = []
            for start in range(0, num_images_per_prompt, batch_size):
                count = min(batch_size, num_images_per_prompt - start)
                generators = [
                    torch.Generator().manual_seed(image_seed(seed, prompt, j)) for j in range(start, start + count)
                ]
                output = pipeline(
                    prompt=prompt,
                    num_images_per_prompt=count,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generators,
                    output_type="pt",
                    **pipeline_kwargs,
                )
                images = output.images if hasattr(output, "images") else output[0]
                chunks.append(torch.as_tensor(images).detach().float().cpu())
                bar.update(count)
            results[prompt] = torch.cat(chunks)
    return results


@dataclass
class EvaluationResult:
    r"""
    Output of [`evaluate`] / [`score_images`].

    Args:
        per_prompt (`list[dict]`): One dict per prompt: `"prompt"`, `"num_images"`, `"freq/<attribute>"` (list of
            class frequencies, also for joint groups such as `"freq/gender,race"`), `"bias/<group>"`,
            `"deviation/<group>"` (with a target), `"clip_t"`, `"clip_i"`, `"dino"` (when computed).
        summary (`dict[str, tuple[float, float]]`): Every scalar metric -> (mean, sd) over prompts.
        classes (`dict[str, list[str]]`): Group -> class (cell) names, the order of the `"freq/..."` lists.
        images (`dict[str, torch.Tensor]`, *optional*): The generated images when requested.
        reference_images (`dict[str, torch.Tensor]`, *optional*): The reference pipeline's images when requested.
    """

    per_prompt: list[dict] = field(default_factory=list)
    summary: dict[str, tuple[float, float]] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    images: dict[str, torch.Tensor] | None = None
    reference_images: dict[str, torch.Tensor] | None = None

    def to_table(self) -> str:
        """The summary as `metric: mean ± sd` lines (two decimals, like the paper's tables)."""
        return "\n".join(f"{name}: {mean:.2f} ± {sd:.2f}" for name, (mean, sd) in self.summary.items())


def _summarise(per_prompt: list[dict]) -> dict[str, tuple[float, float]]:
    keys = [k for k, v in per_prompt[0].items() if isinstance(v, float)] if per_prompt else []
    return {k: mean_std([row.get(k, float("nan")) for row in per_prompt]) for k in keys}


def _groups(attributes, target_distribution):
    """Evaluation groups: every attribute, plus each joint factor of the target; with their targets."""
    groups = {name: ((name,), None) for name in attributes}
    if target_distribution is not None:
        target_distribution = target_distribution.align_to(attributes)
        for factor in target_distribution.factors:
            if factor.given:
                continue  # a conditional target has no single marginal to compare with
            groups[",".join(factor.attributes)] = (factor.attributes, factor.probabilities[0])
    return groups


@torch.no_grad()
def classify_images(images: torch.Tensor, classifier, batch_size: int = 16) -> dict[str, torch.Tensor]:
    r"""
    Class probabilities of every attribute the classifier predicts, batched.

    Args:
        images (`torch.Tensor` of shape `(n, 3, H, W)`): Values in `[0, 1]`.
        classifier ([`AttributeClassifier`]): Any classifier following the contract (dict of logits).
        batch_size (`int`, *optional*, defaults to 16): Images per classifier call.

    Returns:
        `dict[str, torch.Tensor]`: attribute -> `(n, K)` float32 softmax probabilities on the CPU (column `k` is the
        class `classifier.attributes[attribute][k]`). The predicted class is the argmax; its value is the confidence.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    device = _device_of(classifier)
    chunks = {a: [] for a in classifier.attributes}
    for start in range(0, images.shape[0], batch_size):
        logits = classifier(images[start : start + batch_size].to(device))
        for a in classifier.attributes:
            chunks[a].append(logits[a].detach().float().softmax(dim=-1).cpu())
    return {a: torch.cat(v) if v else torch.zeros(0, len(classifier.attributes[a])) for a, v in chunks.items()}


def score_predictions(
    probabilities: Mapping[str, torch.Tensor],
    attributes: Mapping[str, Sequence[str]],
    target_distribution=None,
    mask: torch.Tensor | None = None,
) -> tuple[dict, dict[str, list[str]]]:
    r"""
    Per-prompt class frequencies, bias and deviation from stored predictions (the scoring half of [`score_images`]).

    Args:
        probabilities (`dict[str, torch.Tensor]`): Attribute -> `(n, K)` class probabilities or logits of one
            prompt's images (from [`classify_images`]); only the argmax is used.
        attributes (`dict[str, list[str]]`): The attributes to score and their ordered class names (a classifier's
            `.attributes` or a subset of it).
        target_distribution ([`TargetDistribution`], *optional*): Adds `deviation/<group>` and joint groups.
        mask (`torch.BoolTensor` of shape `(n,)`, *optional*): Images to count (e.g. those with a detected face);
            the others are left out of the frequencies and counted in `"num_excluded"`.

    Returns:
        `(row, classes)`: `row` has `"num_images"`, `"num_excluded"`, `"freq/<group>"` (list), `"bias/<group>"`,
        `"deviation/<group>"` (with a target; `nan` when no image is counted); `classes` maps each group to its
        class (cell) names, the order of the `"freq/..."` lists.
    """
    groups = _groups(attributes, target_distribution)
    first = probabilities[next(iter(attributes))]
    num_images = int(first.shape[0])
    if mask is None:
        mask = torch.ones(num_images, dtype=torch.bool)
    mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
    if mask.shape[0] != num_images:
        raise ValueError(f"`mask` has {mask.shape[0]} entries for {num_images} images; give one per image.")
    predictions = {a: probabilities[a].argmax(dim=-1)[mask] for a in attributes}
    counted = int(mask.sum())
    row: dict = {"num_images": num_images, "num_excluded": num_images - counted}
    classes = {}
    for name, (group_attributes, target) in groups.items():
        classes[name] = ["/".join(cell) for cell in itertools.product(*(attributes[a] for a in group_attributes))]
        cell = torch.zeros(counted, dtype=torch.long)
        for a in group_attributes:
            cell = cell * len(attributes[a]) + predictions[a]
        if counted == 0:
            row[f"freq/{name}"] = [float("nan")] * len(classes[name])
            row[f"bias/{name}"] = float("nan")
            if target is not None:
                row[f"deviation/{name}"] = float("nan")
            continue
        freqs = torch.bincount(cell, minlength=len(classes[name])).double() / counted
        row[f"freq/{name}"] = freqs.tolist()
        row[f"bias/{name}"] = bias_score(freqs)
        if target is not None:
            row[f"deviation/{name}"] = deviation_from_target(freqs, target)
    return row, classes


@torch.no_grad()
def score_images(
    images: Mapping[str, torch.Tensor],
    classifier,
    reference_images: Mapping[str, torch.Tensor] | None = None,
    target_distribution=None,
    clip_model=None,
    clip_tokenizer=None,
    dino_model=None,
    batch_size: int = 16,
) -> EvaluationResult:
    r"""
    Scores stored images: per-prompt class frequencies and bias, deviation from a target, CLIP-T, CLIP-I, DINO.

    Args:
        images (`dict[str, torch.Tensor]`): Prompt -> `(n, 3, H, W)` images in `[0, 1]` (from [`generate_images`]).
        classifier ([`AttributeClassifier`]): Predicts the attributes; frequencies are of its argmax classes.
        reference_images (`dict[str, torch.Tensor]`, *optional*): Prompt -> the original model's images from the same
            noises, for CLIP-I and DINO.
        target_distribution ([`TargetDistribution`], *optional*): Adds `deviation/<group>` for its unconditional
            factors and joint frequencies for its joint factors (e.g. the 8 gender x race cells).
        clip_model (`CLIPModel`, *optional*), clip_tokenizer (*optional*): For CLIP-T (needs both) and CLIP-I.
        dino_model (`Dinov2Model`, *optional*): For DINO.
        batch_size (`int`, *optional*, defaults to 16): Images per classifier / encoder call.

    Returns:
        [`EvaluationResult`] (without images).
    """
    if clip_model is not None and clip_tokenizer is None:
        raise ValueError("`clip_tokenizer` is required with `clip_model` (for CLIP-T); pass the model's tokenizer.")
    result = EvaluationResult()
    for prompt, prompt_images in images.items():
        probabilities = classify_images(prompt_images, classifier, batch_size)
        scores, result.classes = score_predictions(probabilities, classifier.attributes, target_distribution)
        scores.pop("num_excluded")
        row: dict = {"prompt": prompt, **scores}
        if clip_model is not None:
            row["clip_t"] = float(clip_text_similarity(prompt_images, prompt, clip_model, clip_tokenizer).mean())
        if reference_images is not None:
            if prompt not in reference_images:
                raise ValueError(f"`reference_images` has no images for the prompt {prompt!r}; give every prompt's.")
            reference = reference_images[prompt]
            if clip_model is not None:
                row["clip_i"] = float(image_similarity(prompt_images, reference, clip_model, batch_size).mean())
            if dino_model is not None:
                row["dino"] = float(image_similarity(prompt_images, reference, dino_model, batch_size).mean())
        result.per_prompt.append(row)
    if not result.classes:
        result.classes = score_predictions(
            {a: torch.zeros(0, len(c)) for a, c in classifier.attributes.items()},
            classifier.attributes,
            target_distribution,
        )[1]
    result.summary = _summarise(result.per_prompt)
    return result


def evaluate(
    pipeline,
    prompts: str | Sequence[str],
    classifier,
    num_images_per_prompt: int,
    reference_pipeline=None,
    target_distribution=None,
    clip_model=None,
    clip_tokenizer=None,
    dino_model=None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    seed: int = 0,
    return_images: bool = False,
    progress_bar: bool = True,
    **pipeline_kwargs,
) -> EvaluationResult:
    r"""
    The paper's evaluation (Sec. 5.1): generate, classify, and report per-prompt frequencies, bias and similarities
    with each metric's mean ± sd over prompts.

    Prompts are processed one at a time ([`generate_images`] then [`score_images`]), so memory holds one prompt's
    images (unless `return_images=True`). The paper used 60 / 80 / 160 images per prompt for gender / race /
    gender x race.

    Args:
        pipeline: A diffusers text-to-image pipeline (see [`generate_images`] for the call contract).
        prompts (`str` or `list[str]`): Evaluation prompts.
        classifier ([`AttributeClassifier`]): An evaluation classifier (the paper trains one independent of the
            classifier used in training).
        num_images_per_prompt (`int`): Images per prompt.
        reference_pipeline (*optional*): The original (frozen) pipeline, for CLIP-I and DINO; it gets the same seeds.
        target_distribution ([`TargetDistribution`], *optional*): Adds deviations and joint groups.
        clip_model (`CLIPModel`, *optional*), clip_tokenizer (*optional*), dino_model (`Dinov2Model`, *optional*):
            Similarity encoders, see [`score_images`].
        num_inference_steps (`int`, *optional*, defaults to 25), guidance_scale (`float`, *optional*, defaults to
            7.5), batch_size (`int`, *optional*, defaults to 8), seed (`int`, *optional*, defaults to 0): Generation.
        return_images (`bool`, *optional*, defaults to `False`): Keep the images in the result.
        progress_bar (`bool`, *optional*, defaults to `True`): tqdm progress over prompts.
        pipeline_kwargs: Extra arguments for both pipelines (e.g. `height`, `width`, `negative_prompt`).

    Returns:
        [`EvaluationResult`].
    """
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty; give at least one prompt.")
    kwargs = {
        "num_images_per_prompt": num_images_per_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "seed": seed,
        "progress_bar": False,
        **pipeline_kwargs,
    }
    result = EvaluationResult(images={} if return_images else None)
    if return_images and reference_pipeline is not None:
        result.reference_images = {}
    for prompt in tqdm(prompts, disable=not progress_bar, desc="Evaluating"):
        images = generate_images(pipeline, [prompt], **kwargs)
        reference = generate_images(reference_pipeline, [prompt], **kwargs) if reference_pipeline is not None else None
        scored = score_images(
            images, classifier, reference, target_distribution, clip_model, clip_tokenizer, dino_model, batch_size
        )
        result.per_prompt.extend(scored.per_prompt)
        result.classes = scored.classes
        if return_images:
            result.images.update(images)
            if reference is not None:
                result.reference_images.update(reference)
    result.summary = _summarise(result.per_prompt)
    return result
