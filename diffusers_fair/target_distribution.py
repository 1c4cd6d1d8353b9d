"""Target distributions of categorical attributes for the distributional alignment loss (paper Sec. 4.1, 5.2)."""

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

# The paper's classes (Sec. 5.1: binary gender, FairFace race merged into four groups; Sec. 5.2: age split at 39).
# Used only to resolve `"uniform"` when no class names are given; a classifier's own class names take precedence.
DEFAULT_ATTRIBUTES: dict[str, list[str]] = {
    "gender": ["male", "female"],
    "race": ["WMELH", "Asian", "Black", "Indian"],
    "age": ["young", "old"],
}

# Probabilities written by hand (YAML, CLI) must sum to 1 up to this tolerance.
_SUM_TOLERANCE = 1e-6
# Separator of per-attribute class names in a joint cell name, e.g. "male/Asian".
CELL_SEPARATOR = "/"


@dataclass
class TargetFactor:
    r"""
    One term of a [`TargetDistribution`]: a joint target over `attributes`, optionally conditional on `given`.

    Args:
        attributes (`tuple[str, ...]`):
            Attributes aligned jointly by this factor (one optimal transport over the product of their classes).
        classes (`tuple[tuple[str, ...], ...]`):
            Ordered class names of each attribute in `attributes`.
        probabilities (`torch.Tensor` of shape `(num_given_cells, num_cells)`):
            Target probability of each joint cell (row-major over `classes`, the last attribute varying fastest),
            one row per joint cell of the `given` attributes (a single row when `given` is empty). Rows sum to 1.
        given (`tuple[str, ...]`, *optional*, defaults to `()`):
            Attributes this factor is conditioned on; each must be aligned by an earlier factor.
        given_classes (`tuple[tuple[str, ...], ...]`, *optional*, defaults to `()`):
            Ordered class names of each attribute in `given`.
    """

    attributes: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    probabilities: torch.Tensor
    given: tuple[str, ...] = ()
    given_classes: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        """The factor's key as written in a spec, e.g. `"gender,race"` or `"age|gender,race"`."""
        name = ",".join(self.attributes)
        return f"{name}|{','.join(self.given)}" if self.given else name

    @property
    def shape(self) -> tuple[int, ...]:
        """Number of classes of each attribute in `attributes`."""
        return tuple(len(c) for c in self.classes)

    @property
    def cell_names(self) -> list[str]:
        """Names of the joint cells in column order, e.g. `["male/WMELH", "male/Asian", ...]`."""
        return [CELL_SEPARATOR.join(cell) for cell in itertools.product(*self.classes)]

    @property
    def given_cell_names(self) -> list[str]:
        """Names of the joint cells of the `given` attributes in row order (`[""]` when unconditional)."""
        return [CELL_SEPARATOR.join(cell) for cell in itertools.product(*self.given_classes)]


def _check_classes(attribute: str, classes: Sequence[str]) -> list[str]:
    if not attribute or not isinstance(attribute, str):
        raise ValueError(f"Attribute names must be non-empty strings, got {attribute!r}.")
    classes = [str(c).strip() for c in classes]
    if len(classes) == 0 or any(not c for c in classes):
        raise ValueError(f"Attribute {attribute!r} is empty: give at least one non-empty class name, got {classes!r}.")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"Attribute {attribute!r} lists the class(es) {duplicates} more than once; list each once.")
    return classes


def _check_probabilities(name: str, probs: Sequence[float]) -> None:
    probs = [float(p) for p in probs]
    negative = [p for p in probs if p < 0 or not math.isfinite(p)]
    if negative:
        raise ValueError(
            f"Target {name!r} has negative or non-finite probabilities {negative}; use finite values in [0, 1]."
        )
    total = math.fsum(probs)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        # 12 significant digits, so a sum just outside the tolerance (e.g. 1.000002) is not printed as "1".
        raise ValueError(f"Target probabilities of {name!r} must sum to 1, but they sum to {total:.12g}.")


class TargetDistribution:
    r"""
    The distribution that the distributional alignment loss steers generated images towards.

    A target is a sequence of factors ([`TargetFactor`]). Each factor aligns one attribute, or several attributes
    jointly (one optimal transport over the product of their classes, e.g. the 8 cells of gender x race), towards a
    categorical distribution, optionally conditional on attributes aligned by an earlier factor ("age 75/25 within
    every gender x race cell", paper Sec. 5.2). Separate factors are aligned independently: `"gender=uniform;
    race=uniform"` balances each marginal, while `"gender,race=uniform"` balances the 8 intersectional cells.

    Specs (Python dicts, YAML/JSON files and CLI strings share one grammar). Keys: `"gender"`, a joint
    `"gender,race"`, a conditional `"age|gender,race"`. Values: `"uniform"` (class names from `attributes` or the
    paper's defaults), a list of class names (uniform over them), or a mapping class -> probability (joint cells
    named `"male/Asian"`; classes left out of a mapping get probability 0 when the class list is known). CLI strings
    separate factors with `;`, e.g. `"gender=male:0.5,female:0.5;age=young:0.75,old:0.25"` or
    `"gender,race=uniform;age|gender,race=young:0.75,old:0.25"`.

    Args:
        factors (`list[TargetFactor]`):
            The factors, in the order they are aligned. Prefer the `from_*` constructors.

    Examples:

    ```py
    >>> from diffusers_fair import TargetDistribution

    >>> target = TargetDistribution.from_string("gender=uniform;age=young:0.75,old:0.25")
    >>> target.factors[1].probabilities
    tensor([[0.7500, 0.2500]], dtype=torch.float64)
    >>> TargetDistribution.product({"gender": "uniform", "race": "uniform"}).factors[0].shape
    (2, 4)
    ```
    """

    def __init__(self, factors: Sequence[TargetFactor]):
        if not factors:
            raise ValueError("`factors` is empty: a target distribution needs at least one attribute.")
        aligned: dict[str, tuple[str, ...]] = {}
        for factor in factors:
            for attribute, classes in zip(factor.attributes, factor.classes):
                _check_classes(attribute, classes)
                if attribute in aligned:
                    raise ValueError(
                        f"Attribute {attribute!r} is aligned by more than one factor; align it once (use a joint key "
                        f"such as 'gender,race' to align attributes together)."
                    )
            for attribute, classes in zip(factor.given, factor.given_classes):
                if attribute not in aligned:
                    raise ValueError(
                        f"Factor {factor.name!r} is conditioned on {attribute!r}, which is not present in an earlier "
                        f"factor; add a target for {attribute!r} before it "
                        f"(e.g. '{attribute}=uniform;{factor.name}=...')."
                    )
                if tuple(classes) != tuple(aligned[attribute]):
                    raise ValueError(
                        f"Factor {factor.name!r} uses classes {list(classes)} for {attribute!r}, but it is aligned "
                        f"with classes {list(aligned[attribute])}; use the same classes."
                    )
            if set(factor.given) & set(factor.attributes):
                raise ValueError(f"Factor {factor.name!r} cannot be conditioned on an attribute it aligns.")
            probs = torch.as_tensor(factor.probabilities, dtype=torch.float64)
            expected = (math.prod(len(c) for c in factor.given_classes), math.prod(factor.shape))
            if tuple(probs.shape) != expected:
                raise ValueError(
                    f"`probabilities` of factor {factor.name!r} must have shape {expected}, got {tuple(probs.shape)}."
                )
            for row in probs:
                _check_probabilities(factor.name, row.tolist())
            factor.probabilities = probs
            for attribute, classes in zip(factor.attributes, factor.classes):
                aligned[attribute] = tuple(classes)
        self.factors = list(factors)

    # ----------------------------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def uniform(cls, attributes: Mapping[str, Sequence[str]], joint: bool = False) -> "TargetDistribution":
        r"""
        Uniform target over each attribute (`joint=False`) or over the product of all of them (`joint=True`).

        Args:
            attributes (`dict[str, list[str]]`): Attribute name -> class names, e.g. a classifier's `.attributes`.
            joint (`bool`, *optional*, defaults to `False`): Align the intersectional cells instead of each marginal.
        """
        if joint:
            return cls.product({name: list(classes) for name, classes in attributes.items()})
        return cls.from_dict({name: list(classes) for name, classes in attributes.items()})

    @classmethod
    def product(
        cls,
        marginals: Mapping[str, str | Sequence[str] | Mapping[str, float]],
        attributes: Mapping[str, Sequence[str]] | None = None,
    ) -> "TargetDistribution":
        r"""
        A single joint factor whose table is the product of the given marginals (e.g. uniform gender x race).

        Args:
            marginals (`dict`): Attribute -> marginal spec (`"uniform"`, class list or class -> probability).
            attributes (`dict[str, list[str]]`, *optional*): Known class names, e.g. a classifier's `.attributes`.
        """
        singles = cls.from_dict(dict(marginals), attributes=attributes).factors
        if any(f.given for f in singles):
            raise ValueError("`marginals` of `TargetDistribution.product` cannot contain conditional keys ('a|b').")
        table = torch.ones(1, dtype=torch.float64)
        for factor in singles:
            table = (table[:, None] * factor.probabilities[0][None, :]).flatten()
        factor = TargetFactor(
            attributes=tuple(a for f in singles for a in f.attributes),
            classes=tuple(c for f in singles for c in f.classes),
            probabilities=table[None, :],
        )
        return cls([factor])

    @classmethod
    def from_dict(
        cls,
        spec: Mapping[str, str | Sequence[str] | Mapping[str, float]],
        attributes: Mapping[str, Sequence[str]] | None = None,
    ) -> "TargetDistribution":
        r"""
        Builds a target from a mapping `key -> value` (see the class docstring for the grammar).

        Args:
            spec (`dict`): E.g. `{"gender": "uniform", "age|gender": {"young": 0.75, "old": 0.25}}`.
            attributes (`dict[str, list[str]]`, *optional*):
                Known class names (e.g. `classifier.attributes`); classes outside them are rejected. Defaults to the
                paper's classes for `"uniform"` values of `gender`, `race` and `age`.
        """
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"`spec` must be a non-empty mapping of attribute -> target, got {spec!r}.")
        known = {k: _check_classes(k, v) for k, v in (attributes or {}).items()}
        aligned_classes: dict[str, tuple[str, ...]] = {}
        factors = []
        for key, value in spec.items():
            names, given = cls._parse_key(str(key))
            classes = cls._resolve_classes(str(key), names, value, known)
            probs = cls._parse_table(str(key), names, classes, value, known)
            for name, c in zip(names, classes):
                aligned_classes[name] = tuple(c)
            for name in given:
                if name not in aligned_classes:
                    raise ValueError(
                        f"Factor {key!r} is conditioned on {name!r}, which is not present in an earlier factor; add a "
                        f"target for {name!r} before it (e.g. '{name}=uniform;{key}=...')."
                    )
            given_classes = tuple(aligned_classes[name] for name in given)
            num_rows = math.prod(len(c) for c in given_classes)
            factors.append(
                TargetFactor(
                    attributes=tuple(names),
                    classes=tuple(tuple(c) for c in classes),
                    probabilities=probs[None, :].repeat(num_rows, 1),
                    given=tuple(given),
                    given_classes=given_classes,
                )
            )
        return cls(factors)

    @classmethod
    def from_string(cls, spec: str, attributes: Mapping[str, Sequence[str]] | None = None) -> "TargetDistribution":
        r"""
        Parses a CLI string, e.g. `"gender=male:0.5,female:0.5;age=young:0.75,old:0.25"` or `"gender=uniform"`.

        Args:
            spec (`str`): Factors separated by `;`, each `key=value` (see the class docstring).
            attributes (`dict[str, list[str]]`, *optional*): Known class names, e.g. `classifier.attributes`.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"`spec` must be a non-empty string such as 'gender=uniform', got {spec!r}.")
        parsed: dict[str, object] = {}
        for term in filter(None, (t.strip() for t in spec.split(";"))):
            if "=" not in term:
                raise ValueError(
                    f"Target term {term!r} has no '='; write it as 'attribute=uniform' or 'a=x:0.5,y:0.5'."
                )
            key, value = (s.strip() for s in term.split("=", 1))
            if key in parsed:
                raise ValueError(f"Target key {key!r} appears twice in `spec`; give each attribute once.")
            entries = [e.strip() for e in value.split(",")]
            if value == "uniform":
                parsed[key] = "uniform"
            elif all(":" in e for e in entries):
                table: dict[str, float] = {}
                for entry in entries:
                    name, prob = (s.strip() for s in entry.rsplit(":", 1))
                    if name in table:
                        raise ValueError(f"Target {key!r} lists the class {name!r} more than once; list each once.")
                    try:
                        table[name] = float(prob)
                    except ValueError:
                        raise ValueError(f"Target {key!r}: {prob!r} (class {name!r}) is not a number.") from None
                parsed[key] = table
            elif not any(":" in e for e in entries):
                parsed[key] = entries
            else:
                raise ValueError(
                    f"Target {key!r}: give a probability to every class ('a:0.5,b:0.5') or to none (uniform), got "
                    f"{value!r}."
                )
        return cls.from_dict(parsed, attributes=attributes)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, attributes: Mapping[str, Sequence[str]] | None = None
    ) -> "TargetDistribution":
        r"""
        Reads a YAML (`.yaml`/`.yml`) or JSON file holding a spec mapping (see the class docstring).

        Args:
            path (`str` or `os.PathLike`): The file.
            attributes (`dict[str, list[str]]`, *optional*): Known class names, e.g. `classifier.attributes`.
        """
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                spec = yaml.safe_load(f)
            elif path.endswith(".json"):
                spec = json.load(f)
            else:
                raise ValueError(f"`path` {path!r} must end in .yaml, .yml or .json.")
        return cls.from_dict(spec, attributes=attributes)

    # ----------------------------------------------------------------------------------------------------------------
    # Parsing helpers

    @staticmethod
    def _parse_key(key: str) -> tuple[list[str], list[str]]:
        aligned, _, given = key.partition("|")
        names = [n.strip() for n in aligned.split(",")]
        given_names = [n.strip() for n in given.split(",")] if given.strip() else []
        for name in names + given_names:
            if not name:
                raise ValueError(f"Target key {key!r} has an empty attribute name; write e.g. 'age|gender,race'.")
        if len(set(names)) != len(names) or len(set(given_names)) != len(given_names):
            raise ValueError(f"Target key {key!r} names an attribute twice; name each once.")
        if "|" in key and not given_names:
            raise ValueError(f"Target key {key!r} has no attribute after '|'; write e.g. 'age|gender'.")
        return names, given_names

    @staticmethod
    def _resolve_classes(key: str, names: list[str], value, known: dict[str, list[str]]) -> list[list[str]]:
        from_cells: list[list[str]] = [[] for _ in names]
        if isinstance(value, Mapping) and not value:
            raise ValueError(f"Target {key!r} is empty: give at least one class with its probability.")
        if isinstance(value, Mapping):
            # Classes not listed in `attributes` are read off the table's cells, in order of first appearance.
            for cell in value:
                parts = [p.strip() for p in str(cell).split(CELL_SEPARATOR)] if len(names) > 1 else [str(cell)]
                if len(parts) != len(names):
                    raise ValueError(
                        f"Joint cell {cell!r} of {key!r} must name one class of each of {names}, separated by "
                        f"'{CELL_SEPARATOR}'."
                    )
                for seen, part in zip(from_cells, parts):
                    if part not in seen:
                        seen.append(part)
        classes = []
        for name, seen in zip(names, from_cells):
            if name in known:
                classes.append(known[name])
            elif seen:
                classes.append(_check_classes(name, seen))
            elif isinstance(value, Sequence) and not isinstance(value, str) and len(names) == 1:
                classes.append(_check_classes(name, [str(v) for v in value]))
            elif name in DEFAULT_ATTRIBUTES:
                classes.append(list(DEFAULT_ATTRIBUTES[name]))
            else:
                raise ValueError(
                    f"The classes of attribute {name!r} are unknown: list them (e.g. '{name}=a,b'), or pass "
                    f"`attributes` (e.g. `attributes=classifier.attributes`)."
                )
        return classes

    @staticmethod
    def _parse_table(key: str, names, classes, value, known) -> torch.Tensor:
        shape = [len(c) for c in classes]
        num_cells = math.prod(shape)
        if isinstance(value, str):
            if value != "uniform":
                raise ValueError(f"Target {key!r}: the only string value is 'uniform', got {value!r}.")
            return torch.full((num_cells,), 1.0 / num_cells, dtype=torch.float64)
        if isinstance(value, Sequence):
            listed = _check_classes(key, [str(v) for v in value])
            if len(names) != 1:
                raise ValueError(f"Joint target {key!r} needs 'uniform' or a mapping of cells to probabilities.")
            unknown = [c for c in listed if c not in classes[0]]
            if unknown:
                raise ValueError(f"Target {key!r} names unknown class(es) {unknown}; known classes are {classes[0]}.")
            probs = torch.tensor([1.0 / len(listed) if c in listed else 0.0 for c in classes[0]], dtype=torch.float64)
            return probs
        if not isinstance(value, Mapping):
            raise ValueError(f"Target {key!r} must be 'uniform', a list of classes or a mapping, got {value!r}.")
        if not value:
            raise ValueError(f"Target {key!r} is empty: give at least one class with its probability.")
        _check_probabilities(key, list(value.values()))
        probs = torch.zeros(num_cells, dtype=torch.float64)
        for cell, prob in value.items():
            parts = str(cell).split(CELL_SEPARATOR) if len(names) > 1 else [str(cell)]
            if len(parts) != len(names):
                raise ValueError(
                    f"Joint cell {cell!r} of {key!r} must name one class of each of {names}, separated by "
                    f"'{CELL_SEPARATOR}'."
                )
            index = 0
            for part, name, cls_names in zip(parts, names, classes):
                if part.strip() not in cls_names:
                    raise ValueError(
                        f"Target {key!r} names the unknown class {part.strip()!r} of {name!r}; known classes are "
                        f"{list(cls_names)}."
                    )
                index = index * len(cls_names) + cls_names.index(part.strip())
            probs[index] = float(prob)
        return probs

    # ----------------------------------------------------------------------------------------------------------------
    # Queries

    @property
    def attributes(self) -> dict[str, list[str]]:
        """Every aligned attribute -> its ordered class names."""
        return {a: list(c) for f in self.factors for a, c in zip(f.attributes, f.classes)}

    def to_dict(self) -> dict[str, dict[str, float]]:
        """The spec mapping (each key -> cell -> probability); `from_dict(to_dict())` rebuilds the target."""
        return {f.name: dict(zip(f.cell_names, f.probabilities[0].tolist())) for f in self.factors}

    def to_string(self) -> str:
        """The CLI string of this target (round-trips through `from_string` for unconditional/shared-row tables)."""
        terms = []
        for f in self.factors:
            # 12 significant digits: 1/3 must not lose ~1e-6 of mass per cell (the parse's sum tolerance), while 0.5
            # and 0.75 stay readable.
            cells = ",".join(f"{name}:{p:.12g}" for name, p in zip(f.cell_names, f.probabilities[0].tolist()))
            terms.append(f"{f.name}={cells}")
        return ";".join(terms)

    def __repr__(self) -> str:
        return f"TargetDistribution({self.to_string()!r})"

    def align_to(self, attributes: Mapping[str, Sequence[str]]) -> "TargetDistribution":
        r"""
        Checks this target against a classifier's heads and reorders every class list to the classifier's order.

        Args:
            attributes (`dict[str, list[str]]`): The classifier's `.attributes` (attribute -> ordered class names).

        Returns:
            [`TargetDistribution`] whose factors use the classifier's class order, so logits columns line up.
        """
        new_factors = []

        def reorder(name, classes):
            if name not in attributes:
                raise ValueError(
                    f"The target aligns {name!r}, but the classifier has no such head (it has {sorted(attributes)}); "
                    f"use a classifier that predicts {name!r} or drop it from the target."
                )
            heads = list(attributes[name])
            if sorted(heads) != sorted(classes):
                raise ValueError(
                    f"The target's classes of {name!r} {list(classes)} do not match the classifier's {heads}; use "
                    f"the classifier's class names."
                )
            return heads, [list(classes).index(c) for c in heads]

        for f in self.factors:
            orders = [reorder(a, c) for a, c in zip(f.attributes, f.classes)]
            given_orders = [reorder(a, c) for a, c in zip(f.given, f.given_classes)]
            table = f.probabilities.reshape(*[len(c) for c in f.given_classes], *f.shape)
            for dim, (_, perm) in enumerate(given_orders + orders):
                table = table.index_select(dim, torch.tensor(perm))
            new_factors.append(
                TargetFactor(
                    attributes=f.attributes,
                    classes=tuple(tuple(o[0]) for o in orders),
                    probabilities=table.reshape(f.probabilities.shape).clone(),
                    given=f.given,
                    given_classes=tuple(tuple(o[0]) for o in given_orders),
                )
            )
        return TargetDistribution(new_factors)
