r"""
The prompt sets of the paper (Shen et al., ICLR 2024, appendix A.2, A.3, A.8), training lists completed by the
project, and the miniature world's sets. See `README.md` in this folder for where each list comes from.

A prompt file holds one entry per line; lines starting with `#` are comments, and a `# template: ... {term} ...`
line turns every entry into `template.format(term=entry)`.
"""

import os
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent
TEMPLATE_DIRECTIVE = "# template:"
# Sets built from the miniature world's occupations rather than read from a file.
MINIATURE_SETS = {
    "miniature-train": "the miniature world's 40 training occupations, its first template",
    "miniature-heldout": "the miniature world's 12 held-out occupations, its first template",
    "miniature-validation": "the miniature world's 40 training occupations in its second template (for selection)",
}


def list_prompt_sets() -> dict[str, str]:
    r"""
    The shipped prompt sets.

    Returns:
        `dict[str, str]`: set name (what `load_prompts` and `diffusers-fair audit --prompts` take) -> its first
        comment line (the source).
    """
    sets = {}
    for path in sorted(PROMPTS_DIR.glob("*.txt")):
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
        sets[path.stem] = first.lstrip("# ").strip()
    return {**sets, **MINIATURE_SETS}


def _read_prompt_file(path: Path) -> list[str]:
    template = None
    entries: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if text.lower().startswith(TEMPLATE_DIRECTIVE):
                template = text[len(TEMPLATE_DIRECTIVE) :].strip()
                if "{term}" not in template:
                    raise ValueError(
                        f"{str(path)!r} line {number}: the template {template!r} has no '{{term}}'; write e.g. "
                        "'# template: a photo of the face of a {term}, a person'."
                    )
            elif text and not text.startswith("#"):
                entries.append((number, text))
    if not entries:
        raise ValueError(f"The prompt file {str(path)!r} holds no prompts; write one prompt per line.")
    prompts, seen = [], {}
    for number, entry in entries:
        prompt = template.replace("{term}", entry) if template else entry
        if prompt in seen:
            raise ValueError(
                f"{str(path)!r} lists the prompt {prompt!r} twice (lines {seen[prompt]} and {number}); list it once "
                "(images and results are keyed by the prompt)."
            )
        seen[prompt] = number
        prompts.append(prompt)
    return prompts


def load_prompts(name_or_path: str | os.PathLike, limit: int | None = None) -> list[str]:
    r"""
    Loads a prompt set by name or from a text file.

    Args:
        name_or_path (`str` or `os.PathLike`):
            A shipped set (`"occupations-test"`, `"laion-occupations-test"`, `"sports-test"`, `"miniature-heldout"`,
            ...; see [`list_prompt_sets`]) or the path of a text file with one prompt per line (optionally with a
            `# template: ... {term} ...` line).
        limit (`int`, *optional*): Keep only the first `limit` prompts.

    Returns:
        `list[str]`: The prompts, in file order, without duplicates.

    Examples:

    ```py
    >>> from diffusers_fair.prompts import load_prompts

    >>> load_prompts("occupations-test")[0]
    'a photo of the face of a senator, a person'
    ```
    """
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be at least 1, got {limit}.")
    name = str(name_or_path)
    if name in MINIATURE_SETS:
        from ..miniature import OCCUPATIONS_HELDOUT, OCCUPATIONS_TRAIN

        occupations = OCCUPATIONS_HELDOUT if name == "miniature-heldout" else OCCUPATIONS_TRAIN
        # The world has no occupations to spare for validation: its validation prompts are the training occupations
        # in a template that fairness training does not use.
        template = 1 if name == "miniature-validation" else 0
        prompts = [occupation.prompt(template) for occupation in occupations]
    elif os.path.isfile(name):
        prompts = _read_prompt_file(Path(name))
    elif (PROMPTS_DIR / f"{name}.txt").is_file() and os.sep not in name and "/" not in name:
        prompts = _read_prompt_file(PROMPTS_DIR / f"{name}.txt")
    else:
        raise ValueError(
            f"`prompts` {name!r} is neither a prompt file nor a known prompt set; give the path of a text file with "
            f"one prompt per line, or one of: {', '.join(list_prompt_sets())}."
        )
    return prompts[:limit] if limit is not None else prompts
