import json

import pytest
import torch
import yaml

from diffusers_fair import TargetDistribution
from diffusers_fair.target_distribution import DEFAULT_ATTRIBUTES, TargetFactor

torch.set_num_threads(1)


def test_uniform_default_classes_and_string():
    target = TargetDistribution.from_string("gender=uniform")
    assert target.attributes == {"gender": ["male", "female"]}
    torch.testing.assert_close(target.factors[0].probabilities, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def test_non_uniform_and_class_list():
    target = TargetDistribution.from_string("gender=male:0.5,female:0.5; age=young:0.75,old:0.25;skin=light,dark")
    assert [f.name for f in target.factors] == ["gender", "age", "skin"]
    assert target.factors[1].probabilities[0].tolist() == [0.75, 0.25]
    assert target.factors[2].probabilities[0].tolist() == [0.5, 0.5]
    assert target.attributes["skin"] == ["light", "dark"]


def test_product_of_marginals_is_outer_product():
    target = TargetDistribution.product({"gender": {"male": 0.4, "female": 0.6}, "race": "uniform"})
    (factor,) = target.factors
    assert factor.attributes == ("gender", "race")
    assert factor.shape == (2, 4)
    expected = torch.outer(torch.tensor([0.4, 0.6]), torch.full((4,), 0.25)).flatten().double()
    torch.testing.assert_close(factor.probabilities[0], expected)
    assert factor.cell_names[:2] == ["male/WMELH", "male/Asian"]


def test_explicit_joint_table_reads_classes_from_cells():
    table = {"male/a": 0.1, "male/b": 0.2, "female/a": 0.3, "female/b": 0.4}
    target = TargetDistribution.from_dict({"gender,grp": table})
    assert target.attributes == {"gender": ["male", "female"], "grp": ["a", "b"]}
    assert target.factors[0].probabilities[0].tolist() == [0.1, 0.2, 0.3, 0.4]
    # Cells left out of a table get probability 0.
    sparse = TargetDistribution.from_dict({"gender,race": {"male/Asian": 0.5, "female/Black": 0.5}})
    assert sparse.factors[0].probabilities.sum() == 1 and (sparse.factors[0].probabilities > 0).sum() == 2


def test_conditional_factor_repeats_table_per_cell():
    target = TargetDistribution.from_string("gender,race=uniform;age|gender,race=young:0.75,old:0.25")
    factor = target.factors[1]
    assert factor.given == ("gender", "race")
    assert factor.probabilities.shape == (8, 2)
    assert (factor.probabilities[:, 0] == 0.75).all()
    assert factor.given_cell_names[0] == "male/WMELH"


def test_classifier_attributes_take_precedence_and_align_to_reorders():
    heads = {"gender": ["female", "male"], "age": ["old", "young"]}
    target = TargetDistribution.from_string("gender=uniform;age=young:0.75,old:0.25", attributes=heads)
    assert target.attributes["gender"] == ["female", "male"]
    assert target.factors[1].probabilities[0].tolist() == [0.25, 0.75]

    default_order = TargetDistribution.from_string("age=young:0.7,old:0.3;gender=male:0.9,female:0.1")
    aligned = default_order.align_to(heads)
    assert aligned.attributes == {"age": ["old", "young"], "gender": ["female", "male"]}
    assert aligned.factors[0].probabilities[0].tolist() == [0.3, 0.7]
    assert aligned.factors[1].probabilities[0].tolist() == [0.1, 0.9]


def test_align_to_reorders_joint_and_conditional_tables():
    target = TargetDistribution.from_dict(
        {
            "gender,age": {"male/young": 0.1, "male/old": 0.2, "female/young": 0.3, "female/old": 0.4},
            "x|gender": ["a", "b"],
        }
    )
    aligned = target.align_to({"gender": ["female", "male"], "age": ["old", "young"], "x": ["b", "a"]})
    assert aligned.factors[0].probabilities[0].tolist() == [0.4, 0.3, 0.2, 0.1]
    assert aligned.factors[1].given_classes == (("female", "male"),)


def test_round_trips(tmp_path):
    target = TargetDistribution.from_string("gender,race=uniform;age|gender,race=young:0.75,old:0.25")
    again = TargetDistribution.from_string(target.to_string())
    for a, b in zip(target.factors, again.factors):
        assert (a.name, a.classes) == (b.name, b.classes)
        torch.testing.assert_close(a.probabilities, b.probabilities)
    spec = {"gender": "uniform", "age|gender": {"young": 0.75, "old": 0.25}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "t.json").write_text(json.dumps(target.to_dict()))
    from_yaml = TargetDistribution.from_file(tmp_path / "t.yaml")
    assert from_yaml.factors[1].probabilities.tolist() == [[0.75, 0.25], [0.75, 0.25]]
    from_json = TargetDistribution.from_file(tmp_path / "t.json")
    torch.testing.assert_close(from_json.factors[1].probabilities, target.factors[1].probabilities)


@pytest.mark.parametrize(
    "target",
    [
        TargetDistribution.from_string("a=x,y,z"),
        TargetDistribution.from_string("a=v,w,x,y,z"),
        TargetDistribution.from_string("a=1,2,3,4,5,6;b=1,2,3,4,5,6,7"),
        TargetDistribution.from_string("a=x:0.1,y:0.2,z:0.7"),
        TargetDistribution.product({"race": "uniform", "skin": ["a", "b", "c"]}),
        TargetDistribution.from_string("skin=a,b,c;age|skin=young:0.75,old:0.25"),
        TargetDistribution.from_string("skin=a,b,c;hair|skin=s,m,l"),
    ],
)
def test_to_string_round_trips_any_probabilities(target):
    again = TargetDistribution.from_string(target.to_string())
    for a, b in zip(target.factors, again.factors, strict=True):
        assert (a.name, a.classes, a.given_classes) == (b.name, b.classes, b.given_classes)
        torch.testing.assert_close(a.probabilities, b.probabilities, rtol=0, atol=1e-9)


def test_to_string_keeps_simple_values_and_sum_error_shows_digits():
    assert TargetDistribution.from_string("age=young:0.75,old:0.25").to_string() == "age=young:0.75,old:0.25"
    with pytest.raises(ValueError, match=r"they sum to 1\.000002\."):
        TargetDistribution.from_string("gender=male:0.5,female:0.500002")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_target_probabilities_are_refused(value):
    with pytest.raises(ValueError, match="Target 'gender' has negative or non-finite probabilities"):
        TargetDistribution.from_string(f"gender=male:{value},female:0")
    with pytest.raises(ValueError, match="Target 'g' has negative or non-finite probabilities"):
        TargetDistribution([TargetFactor(("g",), (("a", "b"),), torch.tensor([[float(value), 0.0]]))])


def test_uniform_constructor():
    joint = TargetDistribution.uniform(DEFAULT_ATTRIBUTES, joint=True)
    assert joint.factors[0].shape == (2, 4, 2)
    torch.testing.assert_close(joint.factors[0].probabilities, torch.full((1, 16), 1 / 16, dtype=torch.float64))
    assert len(TargetDistribution.uniform(DEFAULT_ATTRIBUTES).factors) == 3


@pytest.mark.parametrize(
    "spec, match",
    [
        ("gender=male:0.6,female:0.6", "sum to 1, but they sum to 1.2"),
        ("gender=male:1.5,female:-0.5", "negative"),
        ("gender=male:0.5,male:0.5", "more than once"),
        ("skin=a,b,a", "more than once"),
        ("age|gender=young:0.75,old:0.25", "conditioned on 'gender', which is not present"),
        ("gender=uniform;gender=uniform", "appears twice"),
        ("gender=uniform;gender,race=uniform", "aligned by more than one factor"),
        ("skin=uniform", "classes of attribute 'skin' are unknown"),
        ("gender", "has no '='"),
        ("gender=male:0.5,female", "to every class"),
        ("gender=male:abc,female:0.5", "is not a number"),
        (",race=uniform", "empty attribute name"),
        ("age|=uniform", "no attribute after"),
        ("", "non-empty string"),
    ],
)
def test_from_string_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        TargetDistribution.from_string(spec)


def test_other_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown class"):
        TargetDistribution.from_dict({"gender": ["male", "x"]}, attributes={"gender": ["male", "female"]})
    with pytest.raises(ValueError, match="unknown class 'man'"):
        TargetDistribution.from_string("gender=man:0.5,female:0.5", attributes=DEFAULT_ATTRIBUTES)
    with pytest.raises(ValueError, match="is empty"):
        TargetDistribution.from_dict({"skin": []})
    with pytest.raises(ValueError, match="is empty"):
        TargetDistribution.from_dict({"skin": {}})
    with pytest.raises(ValueError, match="non-empty mapping"):
        TargetDistribution.from_dict({})
    with pytest.raises(ValueError, match="one class of each"):
        TargetDistribution.from_dict({"gender,race": {"male": 1.0}})
    with pytest.raises(ValueError, match="classifier has no such head"):
        TargetDistribution.from_string("age=uniform").align_to({"gender": ["male", "female"]})
    with pytest.raises(ValueError, match="do not match the classifier"):
        TargetDistribution.from_string("gender=uniform").align_to({"gender": ["man", "woman"]})
    with pytest.raises(ValueError, match="must end in"):
        (tmp_path / "t.txt").write_text("gender: uniform")
        TargetDistribution.from_file(tmp_path / "t.txt")
    with pytest.raises(ValueError, match="must have shape"):
        TargetDistribution([TargetFactor(("g",), (("a", "b"),), torch.tensor([[0.2, 0.3, 0.5]]))])
    with pytest.raises(ValueError, match="`factors` is empty"):
        TargetDistribution([])
    with pytest.raises(ValueError, match="only string value is 'uniform'"):
        TargetDistribution.from_dict({"gender": "balanced"})
