"""The miniature world's data: renderer determinism, attribute/label consistency, occupations, captions."""

import numpy as np
import pytest
import torch

from diffusers_fair.miniature import (
    ATTRIBUTE_WORDS,
    ATTRIBUTES,
    OCCUPATIONS,
    OCCUPATIONS_HELDOUT,
    OCCUPATIONS_TRAIN,
    TEMPLATES,
    hair_growth,
    render,
    sample_dataset,
)
from diffusers_fair.miniature.tokenizer import build_tokenizer, world_words
from diffusers_fair.miniature.world import BACKGROUNDS, SKIN_COLOURS

torch.set_num_threads(1)


def test_render_is_deterministic_per_seed():
    a = render("nurse", "long", "tan", "old", generator=3)
    b = render("nurse", "long", "tan", "old", generator=3)
    c = render("nurse", "long", "tan", "old", generator=4)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("skin", ATTRIBUTES["skin"])
def test_render_draws_the_requested_skin_and_background(skin):
    image = render("judge", "short", skin, "young", generator=0).numpy()
    # Centre of the face (median skips eyes and mouth): skin; a top corner: the occupation's background.
    cheek = np.median(image[:, 13:20, 13:19].reshape(3, -1), axis=1)
    np.testing.assert_allclose(cheek, SKIN_COLOURS[skin], atol=0.06)
    corner = image[:, 0:3, 0:3].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(corner, BACKGROUNDS[OCCUPATIONS[9].background], atol=0.05)


def test_render_hair_length_and_grey_hair_are_visible():
    background = np.array(BACKGROUNDS["red"])
    for seed in range(5):
        short = render("doctor", "short", "light", "young", generator=seed).numpy()
        long = render("doctor", "long", "light", "young", generator=seed).numpy()
        old = render("doctor", "long", "light", "old", generator=seed).numpy()
        # Beside the chin (x=9..10, y=19..21) long hair covers the background; short hair leaves it.
        patch = (slice(None), slice(19, 22), slice(9, 11))
        assert np.abs(short[patch].mean(axis=(1, 2)) - background).max() < 0.06
        assert np.abs(long[patch].mean(axis=(1, 2)) - background).max() > 0.3
        # Old people's hair is grey: bright and unsaturated.
        hair = old[patch].reshape(3, -1).mean(axis=1)
        assert hair.min() > 0.6 and hair.max() - hair.min() < 0.1
        assert long[patch].mean() < 0.5


def test_hair_growth_goes_row_by_row_from_the_short_render_to_the_long_one():
    for index, occupation in enumerate(OCCUPATIONS[::7]):
        path = hair_growth(occupation, "dark", "old", generator=index)
        assert path.shape == (16, 3, 32, 32)
        assert torch.equal(path[0], render(occupation, "short", "dark", "old", generator=index))
        assert torch.equal(path[-1], render(occupation, "long", "dark", "old", generator=index))
        rows = []
        for before, after in zip(path[:-1], path[1:]):
            changed = torch.nonzero((before != after).any(dim=0).any(dim=1)).flatten().tolist()
            assert len(changed) == 1  # one more row of hair per image
            rows.append(changed[0])
        assert rows == sorted(rows)  # from the top down
    generator = np.random.default_rng(3)
    assert torch.equal(hair_growth("nurse", "tan", "young", generator), hair_growth("nurse", "tan", "young", 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"occupation": "wizard"}, "occupation"),
        ({"hair": "curly"}, "hair"),
        ({"skin": "green"}, "skin"),
        ({"age": "middle"}, "age"),
    ],
)
def test_render_rejects_unknown_values(kwargs, match):
    args = {"occupation": "nurse", "hair": "short", "skin": "light", "age": "young", **kwargs}
    with pytest.raises(ValueError, match=match):
        render(**args)


def test_occupations_cover_the_required_biases():
    assert len(OCCUPATIONS_TRAIN) >= 40 and len(OCCUPATIONS_HELDOUT) >= 10
    assert len({o.name for o in OCCUPATIONS}) == len(OCCUPATIONS)
    assert len({(o.background, o.accessory) for o in OCCUPATIONS}) == len(OCCUPATIONS)
    assert not {o.name for o in OCCUPATIONS_TRAIN} & {o.name for o in OCCUPATIONS_HELDOUT}
    for occupation in OCCUPATIONS:
        for attribute, probs in occupation.distributions.items():
            assert len(probs) == len(ATTRIBUTES[attribute])
            assert abs(sum(probs) - 1) < 1e-6
    for attribute in ATTRIBUTES:
        top = [max(o.distributions[attribute]) for o in OCCUPATIONS]
        assert max(top) >= 0.85, attribute  # strongly skewed
        assert any(0.55 <= t <= 0.8 for t in top) or attribute == "skin", attribute  # mildly skewed
        assert min(top) <= 1 / len(ATTRIBUTES[attribute]) + 1e-6, attribute  # balanced
    dominant_skin = {
        int(np.argmax(o.distributions["skin"])) for o in OCCUPATIONS if max(o.distributions["skin"]) > 0.5
    }
    assert dominant_skin == set(range(4))


def test_templates():
    assert TEMPLATES[0] == "a photo of the face of a {occupation}, a person"
    assert len(TEMPLATES) >= 3 and all("{occupation}" in t for t in TEMPLATES)


def test_sample_dataset_matches_distributions_and_captions():
    occupations = [OCCUPATIONS[1], OCCUPATIONS[3], OCCUPATIONS_HELDOUT[0]]
    data = sample_dataset(occupations, images_per_occupation=40, seed=5)
    again = sample_dataset(occupations, images_per_occupation=40, seed=5)
    assert torch.equal(data.images, again.images) and data.captions == again.captions
    assert data.images.shape == (120, 3, 32, 32)
    for i, occupation in enumerate(occupations):
        rows = slice(40 * i, 40 * (i + 1))
        for attribute, probs in occupation.distributions.items():
            counts = torch.bincount(data.labels[attribute][rows], minlength=len(probs)).numpy()
            np.testing.assert_allclose(counts / 40, probs, atol=1 / 40 + 1e-9)
        for caption in data.captions[rows]:
            assert occupation.name in caption
    # A caption that names an attribute names the person's true class.
    named = 0
    for j, caption in enumerate(data.captions):
        for attribute, words in ATTRIBUTE_WORDS.items():
            for class_name, word in words.items():
                if f"{word} " in caption:
                    named += 1
                    assert ATTRIBUTES[attribute][int(data.labels[attribute][j])] == class_name, caption
    assert 0 < named < len(data.captions) * 0.4


def test_render_matches_dataset_labels():
    # The skin colour at the cheek of every dataset image is the colour of its label.
    data = sample_dataset([OCCUPATIONS[20]], images_per_occupation=30, seed=1)
    colours = torch.tensor([SKIN_COLOURS[s] for s in ATTRIBUTES["skin"]])
    cheeks = data.images[:, :, 13:20, 13:19].flatten(2).median(dim=2).values
    nearest = torch.cdist(cheeks, colours).argmin(dim=1)
    assert torch.equal(nearest, data.labels["skin"])


def test_tokenizer_has_one_token_per_world_word(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    assert tokenizer.model_max_length == 77
    for word in world_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Text outside the world still tokenizes, byte by byte.
    assert len(tokenizer("zzyzx", add_special_tokens=False).input_ids) >= 2
