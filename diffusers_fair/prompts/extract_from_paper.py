r"""
Writes the prompt files that the paper lists in full or in part (appendix A.2, A.3, A.8) from its text.

    python -m diffusers_fair.prompts.extract_from_paper PAPER.txt

`PAPER.txt` is the plain text of Shen et al., "Finetuning Text-to-Image Diffusion Models for Fairness" (ICLR 2024,
arXiv:2311.07604). The lists are copied verbatim (typographic quotes kept); each file opens with its source. The
training lists the paper gives only in part are completed by hand in `occupations-train.txt` and
`sports-train.txt` (see the README in this folder); this script writes the parts the paper gives.
"""

import argparse
import ast
import os
import re

FOLDER = os.path.dirname(os.path.abspath(__file__))
CITATION = 'Shen et al., "Finetuning Text-to-Image Diffusion Models for Fairness", ICLR 2024 (arXiv:2311.07604)'

# file name, text that precedes the list in the paper, section, template, note
LISTS = [
    ("occupations-test", "The test occupations are", "A.2", "a photo of the face of a {}, a person", ""),
    ("occupations-validation", "used for validation:", "A.2", "a photo of the face of a {}, a person", ""),
    ("laion-occupations-test", "V2 dataset:", "A.3", None, ""),
    ("sports-train-paper", "Training sports include:", "A.8 (2)", "a person playing {}", "the paper's partial list"),
    (
        "sports-test",
        "Test sports are",
        "A.8 (2)",
        "a person playing {}",
        "the paper says 50 test sports but lists these {n}; all are kept",
    ),
    ("style-context-train-examples", "The training prompts include:", "A.8 (3)", None, "the paper's partial list"),
    ("style-context-test", "The test prompts are:", "A.8 (3)", None, ""),
    ("personal-descriptors-train", "The training prompts are:", "A.8 (4)", None, ""),
    (
        "personal-descriptors-test",
        "The test prompts are",
        "A.8 (4)",
        None,
        "the paper says 10 test prompts but lists these {n}; all are kept",
    ),
]
HEADINGS = {"(2)": "(2) Sports prompts", "(3)": "(3) Occupational prompts with style", "(4)": "(4) personal"}


def _list_after(text: str, marker: str, start: int) -> tuple[list[str], int]:
    position = text.index(marker, start)
    begin = text.index("[", position)
    end = text.index("]", begin)
    body = text[begin + 1 : end].replace(r"\cdots", "")
    # The paper quotes items with ’...’ (occupations, sports) or "..." (free prompts).
    if body.lstrip().startswith("’"):
        items = re.findall(r"’(.*?)’\s*(?:,|$)", body.strip())
    else:
        items = [ast.literal_eval(f'"{m}"') for m in re.findall(r'"((?:[^"\\]|\\.)*)"', body)]
    return [item.strip() for item in items if item.strip()], end


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("paper", help="Plain text of the paper.")
    args = parser.parse_args(argv)
    with open(args.paper, encoding="utf-8") as f:
        text = f.read()
    start = text.index("A.2 Experiment details")
    for name, marker, section, template, note in LISTS:
        # Lists of A.8 (3) and (4) share their markers: search from the section's own heading.
        if section.startswith("A.8"):
            appendix = text.index("A.8 Debiasing multiple concepts at once")
            start = max(start, text.index(HEADINGS[section.split()[1]], appendix))
        items, start = _list_after(text, marker, start)
        lines = [f"# Source: {CITATION}, appendix {section}, verbatim ({len(items)} entries)."]
        if note:
            lines.append(f"# Note: {note.format(n=len(items))}.")
        if template:
            lines.append(f"# template: {template.replace('{}', '{term}')}")
        with open(os.path.join(FOLDER, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines + items) + "\n")
        print(f"{name}: {len(items)}")


if __name__ == "__main__":
    main()
