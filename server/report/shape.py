"""The shape of study.json and results.json as the report reads them, and the check that a file has it.

The report reads these files and nothing else, so a file that was cut short, edited by hand or written
by another program fails here, naming the key that is wrong, instead of somewhere inside a plot.
Only what the report reads is described; other keys may be there and are not looked at.

    check(doc, RESULTS)      # raises ShapeError("'rounds' is an object, not a list")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.privacy import UNBOUNDED
from server.run_folder import FEDERATED_VARIANTS, Variant


class ShapeError(ValueError):
    """What is wrong and where: the path of the key, such as 'rounds[1].sites.hospital-a.auc'."""


def _what(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object"


def _name(where: str) -> str:
    return f"'{where}'" if where else "the file"


class Shape:
    """What a JSON value must be; `check` raises ShapeError where it is not."""

    expected = "?"

    def check(self, value: Any, where: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Leaf(Shape):
    """A string, number, integer or true/false (true and false are not numbers here)."""

    kinds: tuple[type, ...]
    expected: str

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, self.kinds) or (isinstance(value, bool) and bool not in self.kinds):
            raise ShapeError(f"{_name(where)} is {_what(value)}, not {self.expected}")


@dataclass(frozen=True)
class OneOf(Shape):
    """One of a few fixed strings."""

    values: tuple[str, ...]

    @property
    def expected(self) -> str:
        return " or ".join(f"'{v}'" for v in self.values)

    def check(self, value: Any, where: str) -> None:
        if value not in self.values:
            raise ShapeError(f"{_name(where)} is {_what(value)}, not {self.expected}")


@dataclass(frozen=True)
class Nullable(Shape):
    inner: Shape

    @property
    def expected(self) -> str:
        return f"{self.inner.expected} or null"

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.inner.check(value, where)


@dataclass(frozen=True)
class Either(Shape):
    """The first shape, or else the second (named together in the message)."""

    first: Shape
    second: Shape

    @property
    def expected(self) -> str:
        return f"{self.first.expected} or {self.second.expected}"

    def check(self, value: Any, where: str) -> None:
        try:
            self.first.check(value, where)
        except ShapeError:
            try:
                self.second.check(value, where)
            except ShapeError:
                raise ShapeError(f"{_name(where)} is {_what(value)}, not {self.expected}") from None


@dataclass(frozen=True)
class ListOf(Shape):
    item: Shape
    length: int | None = None

    @property
    def expected(self) -> str:
        return f"a list of {self.length}" if self.length is not None else "a list"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise ShapeError(f"{_name(where)} is {_what(value)}, not {self.expected}")
        if self.length is not None and len(value) != self.length:
            raise ShapeError(f"{_name(where)} has {len(value)} item(s), not {self.length}")
        for i, v in enumerate(value):
            self.item.check(v, f"{where}[{i}]")


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ShapeError(f"{_name(where)} is {_what(value)}, not an object")
    return value


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


@dataclass(frozen=True)
class MapOf(Shape):
    """An object whose every value has one shape (sites -> metrics)."""

    value: Shape
    expected = "an object"

    def check(self, value: Any, where: str) -> None:
        for k, v in _object(value, where).items():
            self.value.check(v, _key(where, k))


@dataclass(frozen=True)
class Record(Shape):
    """An object with these keys; a key ending in '?' may be missing. Other keys are not looked at."""

    fields: dict[str, Shape]
    expected = "an object"

    def check(self, value: Any, where: str) -> None:
        obj = _object(value, where)
        for name, shape in self.fields.items():
            key = name.rstrip("?")
            if key in obj:
                shape.check(obj[key], _key(where, key))
            elif not name.endswith("?"):
                raise ShapeError(f"{_name(_key(where, key))} is missing")


@dataclass(frozen=True)
class ByKind(Shape):
    """An object whose shape depends on its "kind" key."""

    kinds: dict[str, Shape]
    expected = "an object"

    def check(self, value: Any, where: str) -> None:
        kind = _object(value, where).get("kind")
        OneOf(tuple(self.kinds)).check(kind, _key(where, "kind"))
        self.kinds[kind].check(value, where)


@dataclass(frozen=True)
class Agrees(Shape):
    """A shape and then a rule across its keys (lists of the same length)."""

    inner: Shape
    rule: Callable[[Any], str | None] = field(compare=False)  # what is wrong, or None

    @property
    def expected(self) -> str:
        return self.inner.expected

    def check(self, value: Any, where: str) -> None:
        self.inner.check(value, where)
        if problem := self.rule(value):
            raise ShapeError(f"{_name(where)}: {problem}" if where else problem)


def check(doc: Any, shape: Shape) -> None:
    """Raise ShapeError unless `doc` has `shape`."""
    shape.check(doc, "")


# ----------------------------------------------------------------------------- results.json

NUMBER = Leaf((int, float), "a number")
COUNT = Leaf((int,), "a whole number")
TEXT = Leaf((str,), "a string")
FLAG = Leaf((bool,), "true or false")
MAYBE = Nullable(NUMBER)
EPSILON = Nullable(Either(NUMBER, OneOf((UNBOUNDED,))))  # common.privacy.reported
INTERVAL = Nullable(ListOf(NUMBER, length=2))

METRICS = Record(
    {
        "n_test?": COUNT,
        **{f"{k}?": MAYBE for k in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")},
        "dice?": MAYBE,
        "hd95?": MAYBE,
        "epsilon?": EPSILON,
    }
)
EVALUATION = Record({"sites?": MapOf(METRICS), "pooled?": METRICS})
ROUND = Record(
    {
        "round": COUNT,
        "sites?": MapOf(METRICS),
        "pooled?": METRICS,
        "train?": MapOf(Record({"n_train": COUNT})),
    }
)
STUDY_CONFIG = Record(
    {
        "name?": TEXT,
        "rounds?": COUNT,
        "model?": Record({"name?": TEXT}),
        "strategy?": Record({"name?": TEXT}),
        "train?": Record({"local_epochs?": COUNT}),
        "privacy?": Record({"enabled?": FLAG, "target_epsilon?": MAYBE}),
    }
)
RESULTS = Record(
    {
        "rounds": ListOf(ROUND),
        "initial?": EVALUATION,
        "final?": Record({"round?": COUNT, "sites?": MapOf(METRICS), "pooled?": METRICS}),
        "study?": STUDY_CONFIG,
        "status?": TEXT,
        "stop_reason?": Nullable(TEXT),
    }
)

# ----------------------------------------------------------------------------- study.json


def _same_length(roc: dict) -> str | None:
    if len(roc["fpr"]) != len(roc["tpr"]):
        return f"'fpr' has {len(roc['fpr'])} points but 'tpr' {len(roc['tpr'])}"
    return None


ROC = Agrees(Record({"fpr": ListOf(NUMBER), "tpr": ListOf(NUMBER)}), _same_length)
EVAL_BLOCK = Record(
    {
        **{f"{k}?": MAYBE for k in ("auc", "sensitivity", "specificity", "balanced_accuracy", "ece")},
        "dice?": MAYBE,
        "hd95?": MAYBE,
        "ci?": Record({f"{k}?": INTERVAL for k in ("auc", "sensitivity", "specificity", "dice", "hd95")}),
        "roc?": Nullable(ROC),
    }
)
TRAINED_ALONE = Record(
    {
        "eval": MapOf(EVAL_BLOCK),
        "private?": FLAG,
        "epsilon?": EPSILON,
        "epsilon_by_round?": Nullable(ListOf(EPSILON)),
    }
)
FEDERATION = {
    "eval": MapOf(EVAL_BLOCK),
    "results": RESULTS,
    "private?": FLAG,
    "epsilon?": Nullable(MapOf(EPSILON)),
}
MODEL = ByKind(
    {
        str(Variant.FEDERATED): Record(FEDERATION),
        str(Variant.LEAVE_ONE_OUT): Record({**FEDERATION, "held_out": TEXT, "nodes": ListOf(TEXT)}),
        str(Variant.LOCAL): TRAINED_ALONE,
        str(Variant.CENTRALIZED): TRAINED_ALONE,
        "personalized": Record({"eval": MapOf(EVAL_BLOCK), "site": TEXT}),
    }
)
COMPARISON = Record(
    {
        "metric?": OneOf(("auc", "dice")),
        "columns": ListOf(TEXT),
        "rows": MapOf(MapOf(Record({"auc?": MAYBE, "dice?": MAYBE, "ci?": INTERVAL}))),
        "gains": MapOf(MapOf(Nullable(Record({"difference?": MAYBE, "ci?": INTERVAL})))),
    }
)


def _rectangular(cs: dict) -> str | None:
    rows, columns = len(cs["rows"]), len(cs["columns"])
    for key in (cs.get("metric", "auc"), "ci"):
        if key not in cs:
            return f"'{key}' is missing: the matrix of the study's metric"
        if len(cs[key]) != rows or any(len(row) != columns for row in cs[key]):
            return f"'{key}' is not {rows} rows (one per model) of {columns} values (one per test set)"
    return None


CROSS_SITE = Agrees(
    Record(
        {
            "rows": ListOf(TEXT),
            "columns": ListOf(TEXT),
            "metric?": OneOf(("auc", "dice")),
            "auc?": ListOf(ListOf(MAYBE)),
            "dice?": ListOf(ListOf(MAYBE)),
            "ci": ListOf(ListOf(INTERVAL)),
        }
    ),
    _rectangular,
)
FEDERATED = OneOf(tuple(str(v) for v in FEDERATED_VARIANTS))


def _consistent(doc: dict) -> str | None:
    """The keys that name each other: every variant has its model, every site its sizes."""
    if doc["primary"] not in doc["variants"]:
        return f"'primary' ('{doc['primary']}') is not one of 'variants' {doc['variants']}"
    if missing := [v for v in doc["variants"] if v not in doc["models"]]:
        return f"'models' lacks the federated run(s) {missing} that 'variants' names"
    if missing := [s for s in doc["sites"] if s not in doc["site_info"]]:
        return f"'site_info' lacks the site(s) {missing}"
    return None


STUDY = Agrees(
    Record(
        {
            "sites": ListOf(TEXT),
            "variants": ListOf(FEDERATED),
            "primary": FEDERATED,
            "status": TEXT,
            "study?": STUDY_CONFIG,
            "settings": Record({"bootstrap_samples": COUNT}),
            "site_info": MapOf(Record({"n_train": COUNT, "n_test": COUNT})),
            "models": MapOf(MODEL),
            "comparison": COMPARISON,
            "cross_site?": CROSS_SITE,
        }
    ),
    _consistent,
)


# ----------------------------------------------------------------------------- validation.json

VALIDATED = Record(
    {
        "label": TEXT,
        "package": TEXT,
        "sha256": TEXT,
        "sites": MapOf(METRICS),
        "pooled": METRICS,
        "failed": MapOf(TEXT),
    }
)
VALIDATION = Record(
    {
        "status": TEXT,
        "metric": OneOf(("auc", "dice")),
        "sites": ListOf(TEXT),
        "packages": ListOf(VALIDATED),
        "cross_site": CROSS_SITE,
    }
)
