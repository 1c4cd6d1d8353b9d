"""The shipped prompt sets: counts as the paper gives them, no duplicates, training and test sets disjoint, loader
errors."""

import pytest

from diffusers_fair.prompts import PROMPTS_DIR, list_prompt_sets, load_prompts

# Counts the paper's appendix lists (A.2, A.3, A.8); see diffusers_fair/prompts/README.md for the two lists whose
# printed length differs from the number stated in the text.
PAPER_COUNTS = {
    "occupations-test": 50,
    "occupations-validation": 10,
    "laion-occupations-test": 40,
    "sports-test": 85,
    "sports-train-paper": 24,
    "style-context-test": 19,
    "personal-descriptors-train": 40,
    "personal-descriptors-test": 20,
}


def _terms(name):
    return [line.strip() for line in open(PROMPTS_DIR / f"{name}.txt", encoding="utf-8") if not line.startswith("#")]


@pytest.mark.parametrize("name", list(list_prompt_sets()))
def test_every_shipped_set_loads_without_duplicates(name):
    prompts = load_prompts(name)
    assert prompts and len(set(prompts)) == len(prompts)
    assert all(p == p.strip() and "{term}" not in p for p in prompts)


def test_paper_counts_and_templates():
    for name, count in PAPER_COUNTS.items():
        assert len(load_prompts(name)) == count, name
    assert load_prompts("occupations-test")[0] == "a photo of the face of a senator, a person"
    assert load_prompts("sports-test")[-1] == "a person playing frontenis"
    assert load_prompts("laion-occupations-test")[3] == "A philosopher reading. Oil painting."
    assert load_prompts("miniature-heldout")[0] == "a photo of the face of a surgeon, a person"
    assert len(load_prompts("miniature-train")) == 40


def test_miniature_validation_prompts_are_the_training_occupations_in_an_untrained_template():
    from diffusers_fair.miniature import OCCUPATIONS_TRAIN

    validation, train = load_prompts("miniature-validation"), load_prompts("miniature-train")
    assert validation == [occupation.prompt(1) for occupation in OCCUPATIONS_TRAIN]
    assert validation[0] == "a portrait of a doctor"
    assert not set(validation) & (set(train) | set(load_prompts("miniature-heldout")))


def test_completed_training_lists_are_large_and_disjoint_from_the_test_sets():
    occupations = set(_terms("occupations-train"))
    assert len(occupations) >= 1000
    assert not occupations & (set(_terms("occupations-test")) | set(_terms("occupations-validation")))
    sports = _terms("sports-train")
    assert 240 <= len(sports) <= 260
    assert set(_terms("sports-train-paper")) <= set(sports)
    assert not set(sports) & set(_terms("sports-test"))
    assert not set(_terms("personal-descriptors-train")) & set(_terms("personal-descriptors-test"))


def test_user_file_with_template_and_limit(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my occupations\n# template: a portrait of a {term}\nbaker\n\nwelder\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["a portrait of a baker", "a portrait of a welder"]
    assert load_prompts(path, limit=1) == ["a portrait of a baker"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("baker\nwelder\nbaker\n", r"twice \(lines 1 and 3\)"),
        ("# only comments\n\n", "holds no prompts"),
        ("# template: a portrait of a {occupation}\nbaker\n", r"has no '\{term\}'"),
    ],
)
def test_bad_prompt_files(content, match, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_prompts(str(path))


def test_unknown_set_lists_the_known_ones():
    with pytest.raises(ValueError, match="known prompt set.*occupations-test.*miniature-heldout"):
        load_prompts("occupations-tset")
    with pytest.raises(ValueError, match="limit"):
        load_prompts("occupations-test", limit=0)


def test_console_script_dispatches_to_the_audit(capsys):
    from diffusers_fair.cli import main

    with pytest.raises(SystemExit) as excinfo:
        main(["audit", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: diffusers-fair audit") and "--compare-base" in out and "--face-detector" in out
    assert main(["auditt"]) == 2
    assert "unknown command 'auditt'; use one of: audit" in capsys.readouterr().err
    assert main([]) == 2 and "commands:" in capsys.readouterr().out
