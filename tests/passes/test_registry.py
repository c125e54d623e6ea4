"""String specs: parsing by field type, clear errors with suggestions, round trips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from graphpress.graph import PassSpecError
from graphpress.passes import Pass, describe, from_spec, registered, to_spec
from graphpress.passes.registry import _parse_value


@dataclass(frozen=True)
class _Typed(Pass):
    name: ClassVar[str] = "typed"
    flag: bool = False
    count: int = 1
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ()
    alpha: float | None = None


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("flag", "true", True), ("flag", "0", False), ("count", "7", 7), ("ratio", "0.25", 0.25),
        ("mode", "b", "b"), ("names", "x|y.*", ("x", "y.*")), ("alpha", "0.3", 0.3),
        ("alpha", "none", None),
    ],
)
def test_values_are_parsed_by_field_type(key, raw, expected):
    hints = {"flag": bool, "count": int, "ratio": float, "mode": Literal["a", "b"],
             "names": tuple[str, ...], "alpha": float | None}
    assert _parse_value("typed", key, raw, hints[key]) == expected


@pytest.mark.parametrize(
    "key, raw, message",
    [("flag", "maybe", "not a valid bool"), ("count", "1.5", "not a valid int"),
     ("mode", "c", "must be one of a, b"), ("alpha", "high", "not a valid float")],
)
def test_bad_values_say_what_is_valid(key, raw, message):
    hints = {"flag": bool, "count": int, "mode": Literal["a", "b"], "alpha": float | None}
    with pytest.raises(PassSpecError, match=message):
        _parse_value("typed", key, raw, hints[key])


def test_builtin_specs_round_trip_and_errors():
    passes = registered()
    assert {"dce", "fold-constants", "insert-qdq", "quantize-weights"} <= passes.keys()
    built = from_spec("fold-constants:max_bytes=1000")
    assert built.max_bytes == 1000 and to_spec(built) == "fold-constants:max_bytes=1000"
    assert from_spec(to_spec(built)) == built
    assert to_spec(from_spec("dce")) == "dce"
    with pytest.raises(PassSpecError, match="did you mean 'dce'"):
        from_spec("dc")
    with pytest.raises(PassSpecError, match="needs a value"):
        from_spec("fold-constants:max_bytes")
    with pytest.raises(PassSpecError, match="non-empty"):
        from_spec("  ")


def test_describe_lists_every_pass_with_options():
    rows = {row["name"]: row for row in describe()}
    assert rows.keys() == registered().keys()
    options = {o["name"]: o for o in rows["fold-constants"]["options"]}
    assert "max_bytes" in options and options["max_bytes"]["default"] > 0
    assert rows["dce"]["supports"] == ["fx", "onnx"] and rows["dce"]["summary"]
