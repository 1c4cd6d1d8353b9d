"""Hub model cards for fairness adaptors, with the measured bias before and after."""

import os
from collections.abc import Mapping, Sequence

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "templates", "fair_adaptor_card.md")
TAGS = ["diffusers", "lora", "text-to-image", "stable-diffusion", "fairness", "diffusers-training"]


def _format(value: Sequence[float] | float | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (tuple, list)):
        return f"{value[0]:.3f} ± {value[1]:.3f}"
    return f"{value:.3f}"


def make_model_card(
    base_model: str,
    target: str,
    classifier: str,
    attributes: Sequence[str],
    metrics_before: Mapping[str, tuple[float, float] | float],
    metrics_after: Mapping[str, tuple[float, float] | float],
    settings: Mapping[str, object],
    usage: str,
    eval_classifier: str | None = None,
    num_eval_prompts: int = 0,
    eval_images_per_prompt: int = 0,
    grid: str | None = None,
    sampling_floor: Mapping[str, float] | None = None,
    license: str = "apache-2.0",
    title: str | None = None,
) -> ModelCard:
    r"""
    Builds the model card of a fairness adaptor from the package's template.

    Args:
        base_model (`str`): The base model's Hub id or name.
        target (`str`): The target distribution (its string form).
        classifier (`str`): The classifier used in training.
        attributes (`list[str]`): The aligned attributes.
        metrics_before (`dict`), metrics_after (`dict`): Metric name -> `(mean, sd)` over prompts (or a float), for
            the base model and with the adaptor; rows are the union of both.
        settings (`dict`): Training settings to list (never a token).
        usage (`str`): Python code that loads and uses the adaptor.
        eval_classifier (`str`, *optional*): The evaluation classifier (defaults to `classifier`).
        num_eval_prompts (`int`), eval_images_per_prompt (`int`): The evaluation's size.
        grid (`str`, *optional*): Relative path of the validation grid image.
        sampling_floor (`dict[str, float]`, *optional*): Metric name -> what a model exactly on target measures on
            average at `eval_images_per_prompt` images per prompt ([`~diffusers_fair.metrics.sampling_floor`]); adds
            a column.
        license (`str`, *optional*, defaults to `"apache-2.0"`): The card's license.
        title (`str`, *optional*): The card's heading.

    Returns:
        `huggingface_hub.ModelCard` (call `.save(path)` or push it).
    """
    # `hub_token`, `token`, `api_key`, ...; not `num_prefix_tokens`, a setting.
    hidden = [key for key in settings if key.lower().endswith(("token", "key", "password", "secret"))]
    if hidden:
        raise ValueError(f"`settings` must not contain credentials, got {hidden}.")
    names = list(dict.fromkeys([*metrics_before, *metrics_after]))
    floor = sampling_floor or {}
    rows = [
        {
            "name": name,
            "before": _format(metrics_before.get(name)),
            "after": _format(metrics_after.get(name)),
            "floor": _format(floor[name]) if name in floor else "",
        }
        for name in names
    ]
    card_data = ModelCardData(library_name="diffusers", base_model=base_model, license=license, tags=TAGS)
    # Only Hub ids ("org/name") get a link; local folders and the miniature world do not.
    is_hub_id = base_model.count("/") == 1 and not os.path.exists(base_model)
    base_model_url = f"https://huggingface.co/{base_model}" if is_hub_id else None
    return ModelCard.from_template(
        card_data,
        template_path=TEMPLATE_PATH,
        title=title or f"Fairness adaptor for {base_model}",
        base_model=base_model,
        base_model_url=base_model_url,
        attributes=", ".join(attributes),
        target=target,
        classifier=classifier,
        eval_classifier=eval_classifier or classifier,
        eval_classifier_independent=eval_classifier is not None and eval_classifier != classifier,
        num_eval_prompts=num_eval_prompts,
        eval_images_per_prompt=eval_images_per_prompt,
        metric_rows=rows,
        has_floor=any(name in floor for name in names),
        settings=list(settings.items()),
        usage=usage,
        grid=grid,
    )
