"""The miniature world's data: pixel-art people with known attributes and occupation-dependent biases.

Every image is drawn procedurally with numpy, so the ground truth of every attribute is exact. Attribute names say
what they are (`hair` length, `skin` tone, `age` shown by grey hair); they are stand-ins for the paper's gender,
race and age, not depictions of them. Each occupation has a visible context (a background colour and an
accessory) so that semantics preservation can be measured, and its own attribute distributions.
"""

import copy
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32

ATTRIBUTES: dict[str, list[str]] = {
    "hair": ["short", "long"],
    "skin": ["light", "medium", "tan", "dark"],
    "age": ["young", "old"],
}

# Words that name an attribute class in a caption ("a photo of the face of a long-haired nurse, a person").
ATTRIBUTE_WORDS: dict[str, dict[str, str]] = {
    "hair": {"short": "short-haired", "long": "long-haired"},
    "skin": {"light": "light-skinned", "medium": "medium-skinned", "tan": "tan-skinned", "dark": "dark-skinned"},
    "age": {"young": "young", "old": "old"},
}

# Caption templates. `TEMPLATES[0]` is the paper's prompt; the others exist so that finetuning on the first one can
# be tested on templates it never saw. The base model is trained on all of them.
TEMPLATES: list[str] = [
    "a photo of the face of a {occupation}, a person",
    "a portrait of a {occupation}",
    "a picture of a person who works as a {occupation}",
    "a close-up photo of a {occupation}",
]

SKIN_COLOURS = {
    "light": (0.96, 0.84, 0.74),
    "medium": (0.84, 0.64, 0.48),
    "tan": (0.64, 0.44, 0.29),
    "dark": (0.36, 0.23, 0.15),
}
YOUNG_HAIR_COLOURS = [(0.07, 0.05, 0.04), (0.24, 0.14, 0.07), (0.42, 0.20, 0.09)]  # black, dark brown, auburn
OLD_HAIR_GREY = (0.72, 0.93)  # range of the grey level of old people's hair
SHIRT_COLOURS = [(0.55, 0.55, 0.58), (0.30, 0.30, 0.32), (0.78, 0.72, 0.60), (0.35, 0.45, 0.60)]

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.20, 0.20),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.95, 0.90, 0.20),
    "lime": (0.60, 0.90, 0.20),
    "green": (0.15, 0.60, 0.25),
    "teal": (0.10, 0.55, 0.55),
    "cyan": (0.40, 0.85, 0.95),
    "blue": (0.20, 0.35, 0.90),
    "navy": (0.10, 0.12, 0.40),
    "purple": (0.55, 0.25, 0.75),
    "magenta": (0.90, 0.30, 0.75),
    "pink": (0.98, 0.70, 0.80),
    "olive": (0.50, 0.50, 0.10),
}
ACCESSORIES = ["none", "hat", "badge", "frame"]
HAT_COLOUR, HAT_BAND_COLOUR = (0.20, 0.22, 0.30), (0.95, 0.80, 0.10)
BADGE_COLOUR, FRAME_COLOUR = (1.00, 0.85, 0.00), (1.00, 1.00, 1.00)

# Skin-tone distributions by name: a capital letter is a strong skew (0.85) towards that tone, a small letter a mild
# one (0.4), two letters split 0.45/0.45 between two tones, "=" is uniform.
_SKIN_PROFILES = {
    **{t[0].upper(): [0.85 if s == t else 0.05 for s in ATTRIBUTES["skin"]] for t in ATTRIBUTES["skin"]},
    **{t[0]: [0.4 if s == t else 0.2 for s in ATTRIBUTES["skin"]] for t in ATTRIBUTES["skin"]},
    "LM": [0.45, 0.45, 0.05, 0.05],
    "MT": [0.05, 0.45, 0.45, 0.05],
    "TD": [0.05, 0.05, 0.45, 0.45],
    "LD": [0.45, 0.05, 0.05, 0.45],
    "=": [0.25, 0.25, 0.25, 0.25],
}

# name, P(hair=long), P(age=old), skin profile. The first 40 are for fairness training, the last 12 are held out
# (the base model sees them with their biases; fairness finetuning never does). Strong (0.9/0.1), mild and
# balanced distributions appear in every attribute, and the dominant skin tone differs by occupation.
_OCCUPATION_TABLE = [
    ("doctor", 0.25, 0.50, "L"),
    ("nurse", 0.90, 0.25, "m"),
    ("teacher", 0.75, 0.50, "="),
    ("engineer", 0.10, 0.25, "LM"),
    ("chef", 0.25, 0.50, "t"),
    ("farmer", 0.25, 0.75, "T"),
    ("pilot", 0.10, 0.50, "L"),
    ("firefighter", 0.10, 0.25, "l"),
    ("lawyer", 0.40, 0.50, "LM"),
    ("judge", 0.25, 0.90, "L"),
    ("scientist", 0.40, 0.60, "m"),
    ("artist", 0.60, 0.40, "="),
    ("musician", 0.50, 0.25, "d"),
    ("dancer", 0.90, 0.10, "MT"),
    ("writer", 0.50, 0.75, "l"),
    ("librarian", 0.90, 0.75, "L"),
    ("baker", 0.60, 0.50, "m"),
    ("butcher", 0.10, 0.50, "t"),
    ("carpenter", 0.10, 0.60, "T"),
    ("plumber", 0.10, 0.40, "TD"),
    ("electrician", 0.25, 0.25, "M"),
    ("mechanic", 0.10, 0.40, "D"),
    ("architect", 0.40, 0.60, "l"),
    ("dentist", 0.50, 0.50, "LD"),
    ("pharmacist", 0.75, 0.40, "M"),
    ("accountant", 0.50, 0.60, "l"),
    ("cashier", 0.75, 0.10, "TD"),
    ("secretary", 0.90, 0.40, "LM"),
    ("receptionist", 0.90, 0.10, "m"),
    ("janitor", 0.25, 0.75, "D"),
    ("gardener", 0.40, 0.75, "t"),
    ("sailor", 0.10, 0.50, "="),
    ("soldier", 0.10, 0.10, "d"),
    ("athlete", 0.50, 0.10, "D"),
    ("designer", 0.75, 0.25, "LD"),
    ("photographer", 0.60, 0.40, "="),
    ("journalist", 0.60, 0.50, "MT"),
    ("programmer", 0.25, 0.10, "LM"),
    ("tailor", 0.60, 0.90, "T"),
    ("hairdresser", 0.90, 0.25, "d"),
    # held out
    ("surgeon", 0.10, 0.60, "L"),
    ("waiter", 0.25, 0.10, "t"),
    ("professor", 0.25, 0.90, "l"),
    ("cleaner", 0.90, 0.50, "TD"),
    ("miner", 0.10, 0.50, "D"),
    ("poet", 0.75, 0.75, "="),
    ("guard", 0.10, 0.40, "d"),
    ("banker", 0.25, 0.75, "LM"),
    ("driver", 0.50, 0.50, "T"),
    ("editor", 0.60, 0.60, "m"),
    ("painter", 0.75, 0.25, "MT"),
    ("midwife", 0.90, 0.40, "M"),
]
NUM_TRAIN_OCCUPATIONS = 40


@dataclass(frozen=True)
class Occupation:
    r"""
    One occupation of the miniature world.

    Args:
        name (`str`): the word used in captions, e.g. `"nurse"`.
        background (`str`): key of `BACKGROUNDS`, the background colour of its images.
        accessory (`str`): one of `ACCESSORIES`; `(background, accessory)` is unique per occupation.
        distributions (`dict[str, tuple[float, ...]]`):
            For each attribute of `ATTRIBUTES`, the probabilities of its classes (in `ATTRIBUTES` order).
        heldout (`bool`): whether fairness finetuning must leave it out.
    """

    name: str
    background: str
    accessory: str
    distributions: dict[str, tuple[float, ...]]
    heldout: bool

    def prompt(self, template: int | str = 0) -> str:
        """The caption of this occupation with `TEMPLATES[template]` (or a template string with `{occupation}`)."""
        template = TEMPLATES[template] if isinstance(template, int) else template
        return template.format(occupation=self.name)


def _build_occupations() -> list[Occupation]:
    backgrounds = list(BACKGROUNDS)
    occupations = []
    for index, (name, p_long, p_old, skin_profile) in enumerate(_OCCUPATION_TABLE):
        occupations.append(
            Occupation(
                name=name,
                # 13 colours x 4 accessories: every occupation gets its own pair.
                background=backgrounds[index % len(backgrounds)],
                accessory=ACCESSORIES[index // len(backgrounds)],
                distributions={
                    "hair": (round(1 - p_long, 4), p_long),
                    "skin": tuple(_SKIN_PROFILES[skin_profile]),
                    "age": (round(1 - p_old, 4), p_old),
                },
                heldout=index >= NUM_TRAIN_OCCUPATIONS,
            )
        )
    return occupations


OCCUPATIONS: list[Occupation] = _build_occupations()
OCCUPATIONS_TRAIN: list[Occupation] = [o for o in OCCUPATIONS if not o.heldout]
OCCUPATIONS_HELDOUT: list[Occupation] = [o for o in OCCUPATIONS if o.heldout]
OCCUPATION_NAMES: list[str] = [o.name for o in OCCUPATIONS]


def get_occupation(occupation: str | Occupation) -> Occupation:
    """Looks an occupation up by name; raises a `ValueError` naming the known ones otherwise."""
    if isinstance(occupation, Occupation):
        return occupation
    for candidate in OCCUPATIONS:
        if candidate.name == occupation:
            return candidate
    raise ValueError(
        f"`occupation` {occupation!r} is not an occupation of the miniature world; use one of {OCCUPATION_NAMES}."
    )


def _check_class(attribute: str, value: str) -> None:
    if value not in ATTRIBUTES[attribute]:
        raise ValueError(f"`{attribute}` must be one of {ATTRIBUTES[attribute]}, got {value!r}.")


def render(
    occupation: str | Occupation,
    hair: str,
    skin: str,
    age: str,
    generator: np.random.Generator | int | None = None,
) -> torch.Tensor:
    r"""
    Draws one person of the miniature world.

    Args:
        occupation (`str` or `Occupation`): the occupation, which sets the background colour and accessory.
        hair (`str`): `"short"` or `"long"` (long hair falls to the shoulders).
        skin (`str`): one of `"light"`, `"medium"`, `"tan"`, `"dark"`.
        age (`str`): `"young"` (dark hair) or `"old"` (grey hair).
        generator (`numpy.random.Generator` or `int`, *optional*):
            Source of the small random variations (position, hair and shirt colour, pixel noise); an `int` is a
            seed. The same seed gives the same image.

    Returns:
        `torch.Tensor` of shape `(3, 32, 32)`, float32, values in `[0, 1]`.
    """
    occupation = get_occupation(occupation)
    for attribute, value in (("hair", hair), ("skin", skin), ("age", age)):
        _check_class(attribute, value)
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)

    size = IMAGE_SIZE
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[occupation.background]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = 16 + int(rng.integers(-1, 2))
    cy = 14 + int(rng.integers(-1, 2))

    skin_colour = np.clip(np.array(SKIN_COLOURS[skin]) + rng.uniform(-0.02, 0.02, 3), 0, 1)
    if age == "old":
        hair_colour = np.full(3, rng.uniform(*OLD_HAIR_GREY))
    else:
        hair_colour = np.array(YOUNG_HAIR_COLOURS[rng.integers(len(YOUNG_HAIR_COLOURS))])
    hair_colour = np.clip(hair_colour + rng.uniform(-0.03, 0.03, 3), 0, 1)
    shirt_colour = np.array(SHIRT_COLOURS[rng.integers(len(SHIRT_COLOURS))])

    # Shoulders and neck.
    shoulders = ((xx - cx) / 11.0) ** 2 + ((yy - 32.0) / 8.0) ** 2 <= 1.0
    image[shoulders] = shirt_colour
    image[cy + 5 : cy + 10, cx - 2 : cx + 2] = skin_colour
    # Long hair is drawn behind the face and falls to the shoulders.
    if hair == "long":
        image[cy - 4 : cy + 11, cx - 8 : cx + 8] = hair_colour
    face = ((xx - cx + 0.5) / 5.5) ** 2 + ((yy - cy) / 6.5) ** 2 <= 1.0
    image[face] = skin_colour
    cap = (((xx - cx + 0.5) / 7.5) ** 2 + ((yy - cy + 2) / 7.0) ** 2 <= 1.0) & (yy <= cy - 3)
    image[cap] = hair_colour
    # Eyes and mouth.
    image[cy, cx - 3 : cx - 1] = (0.05, 0.05, 0.08)
    image[cy, cx + 1 : cx + 3] = (0.05, 0.05, 0.08)
    image[cy + 3, cx - 2 : cx + 2] = skin_colour * 0.6

    if occupation.accessory == "hat":
        image[max(cy - 11, 0) : cy - 6, cx - 5 : cx + 5] = HAT_COLOUR
        image[cy - 7, cx - 5 : cx + 5] = HAT_BAND_COLOUR
        image[cy - 6, cx - 8 : cx + 8] = HAT_COLOUR
    elif occupation.accessory == "badge":
        image[26:30, cx + 3 : cx + 8] = BADGE_COLOUR
    elif occupation.accessory == "frame":
        image[:2], image[-2:], image[:, :2], image[:, -2:] = (FRAME_COLOUR,) * 4

    image += rng.normal(0.0, 0.025, image.shape).astype(np.float32)
    return torch.from_numpy(np.clip(image, 0.0, 1.0).transpose(2, 0, 1).copy())


def hair_growth(
    occupation: str | Occupation,
    skin: str,
    age: str,
    generator: np.random.Generator | int | None = None,
) -> torch.Tensor:
    r"""
    One person's hair grown row by row, from `short` to `long`: images the world never samples, to probe how
    classifiers read in-between hair and to teach them to.

    The person is rendered twice from the same random draws, with `short` and with `long` hair; the two images differ
    only in the rows of hair below the cap. Image `k` has the long image's first `k` of those rows (from the top)
    and the short image's rows below them.

    Args:
        occupation (`str` or `Occupation`), skin (`str`), age (`str`): as in [`render`].
        generator (`numpy.random.Generator` or `int`, *optional*): as in [`render`]; both renders use the same draws.

    Returns:
        `torch.Tensor` of shape `(n + 1, 3, 32, 32)`: image 0 is `render(..., hair="short")`, image `n` is
        `render(..., hair="long")`, each for the same draws; `n` is the number of rows the long hair adds (15).
    """
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    long_rng = copy.deepcopy(rng)
    short = render(occupation, "short", skin, age, rng)
    long = render(occupation, "long", skin, age, long_rng)
    rows = torch.nonzero((short != long).any(dim=2).any(dim=0)).flatten().tolist()
    images = [short]
    for row in rows:
        image = images[-1].clone()
        image[:, row] = long[:, row]
        images.append(image)
    return torch.stack(images)


def attribute_caption(occupation: str | Occupation, template: int | str = 0, attribute_word: str | None = None) -> str:
    """A caption, optionally naming an attribute: `"a photo of the face of a long-haired nurse, a person"`."""
    occupation = get_occupation(occupation)
    name = occupation.name if attribute_word is None else f"{attribute_word} {occupation.name}"
    template = TEMPLATES[template] if isinstance(template, int) else template
    return template.format(occupation=name)


@dataclass
class MiniatureDataset:
    r"""
    A batch of rendered people.

    Args:
        images (`torch.Tensor` of shape `(N, 3, 32, 32)`): values in `[0, 1]`.
        labels (`dict[str, torch.LongTensor]`): attribute -> class index of shape `(N,)` (order of `ATTRIBUTES`).
        occupations (`torch.LongTensor` of shape `(N,)`): index into `OCCUPATIONS`.
        captions (`list[str]`): one caption per image.
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    occupations: torch.Tensor
    captions: list[str]


def sample_dataset(
    occupations: list[Occupation] | None = None,
    images_per_occupation: int = 120,
    seed: int = 0,
    attribute_word_probability: float = 0.15,
) -> MiniatureDataset:
    r"""
    Renders a seeded dataset whose per-occupation attribute frequencies follow each occupation's distributions.

    Class counts are exact (largest-remainder rounding of `p * images_per_occupation`), each attribute is shuffled
    independently, so the empirical frequencies equal the specified ones up to rounding.

    Args:
        occupations (`list[Occupation]`, *optional*, defaults to all of `OCCUPATIONS`): which occupations to draw.
        images_per_occupation (`int`, defaults to 120): images per occupation.
        seed (`int`, defaults to 0): seed of labels, templates and drawing; same seed, same dataset.
        attribute_word_probability (`float`, defaults to 0.15):
            Fraction of captions that name one true attribute of the person ("a long-haired nurse").

    Returns:
        `MiniatureDataset` with `N = len(occupations) * images_per_occupation` images.
    """
    if images_per_occupation < 1:
        raise ValueError(f"`images_per_occupation` must be >= 1, got {images_per_occupation}.")
    if not 0.0 <= attribute_word_probability <= 1.0:
        raise ValueError(f"`attribute_word_probability` must be in [0, 1], got {attribute_word_probability}.")
    occupations = OCCUPATIONS if occupations is None else [get_occupation(o) for o in occupations]
    rng = np.random.default_rng(seed)
    images, captions, occ_ids = [], [], []
    labels = {attribute: [] for attribute in ATTRIBUTES}
    n = images_per_occupation
    for occupation in occupations:
        per_attribute = {}
        for attribute, probs in occupation.distributions.items():
            exact = np.array(probs) * n
            counts = np.floor(exact).astype(int)
            counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
            per_attribute[attribute] = rng.permutation(np.repeat(np.arange(len(probs)), counts))
        for i in range(n):
            classes = {a: ATTRIBUTES[a][int(per_attribute[a][i])] for a in ATTRIBUTES}
            images.append(render(occupation, **classes, generator=rng))
            word = None
            if rng.random() < attribute_word_probability:
                attribute = list(ATTRIBUTES)[rng.integers(len(ATTRIBUTES))]
                word = ATTRIBUTE_WORDS[attribute][classes[attribute]]
            captions.append(attribute_caption(occupation, int(rng.integers(len(TEMPLATES))), word))
            for a in ATTRIBUTES:
                labels[a].append(int(per_attribute[a][i]))
            occ_ids.append(OCCUPATION_NAMES.index(occupation.name))
    return MiniatureDataset(
        images=torch.stack(images),
        labels={a: torch.tensor(v, dtype=torch.long) for a, v in labels.items()},
        occupations=torch.tensor(occ_ids, dtype=torch.long),
        captions=captions,
    )
