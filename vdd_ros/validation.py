"""One error format for bad input, used by every layer: ``<field>: expected <what>, got <actual>``.

Standard library and numpy only (the robot side uses it without torch). Each check returns
the value it accepted, so callers can validate and assign in one line.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np


class FieldError(ValueError):
    """A named field holds a value it must not hold."""

    def __init__(self, field_name: str, expected: str, actual: Any):
        self.field_name = field_name
        self.expected = expected
        self.actual = actual
        super().__init__(f"{field_name}: expected {expected}, got {actual!r}")


def fail(field_name: str, expected: str, actual: Any, error: type[FieldError] = FieldError) -> NoReturn:
    raise error(field_name, expected, actual)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))


def check_int(field_name: str, value, low: int | None = None, high: int | None = None,
              error: type[FieldError] = FieldError) -> int:
    """An integer (not a bool) in ``[low, high]``."""
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        fail(field_name, _range_text("an integer", low, high, False), value, error)
    return int(value)


def check_float(field_name: str, value, low: float | None = None, high: float | None = None,
                strict_low: bool = False, error: type[FieldError] = FieldError) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``strict_low``)."""
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if strict_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        fail(field_name, _range_text("a finite number", low, high, strict_low), value, error)
    return float(value)


def check_bool(field_name: str, value, error: type[FieldError] = FieldError) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        fail(field_name, "true or false", value, error)
    return bool(value)


def check_choice(field_name: str, value, choices: Sequence, error: type[FieldError] = FieldError):
    if value not in choices:
        fail(field_name, f"one of {list(choices)}", value, error)
    return value


def finite_vector(field_name: str, values, size: int, positive: bool = False,
                  error: type[FieldError] = FieldError) -> tuple[float, ...]:
    """``size`` finite numbers (each > 0 with ``positive``) as a tuple of floats."""
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        fail(field_name, f"{size} numbers", values, error)
    if arr.size != size:
        fail(field_name, f"{size} numbers", f"{arr.size} numbers", error)
    if not np.all(np.isfinite(arr)):
        fail(field_name, "finite numbers", [float(v) for v in arr], error)
    if positive and np.any(arr <= 0):
        fail(field_name, "numbers > 0", [float(v) for v in arr], error)
    return tuple(float(v) for v in arr)


def _range_text(kind: str, low, high, strict_low: bool) -> str:
    if low is not None and high is not None:
        return f"{kind} in {'(' if strict_low else '['}{low}, {high}]"
    if low is not None:
        return f"{kind} {'>' if strict_low else '>='} {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind
