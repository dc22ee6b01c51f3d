"""Checks of config fields at construction, each failing with one line: the field, its value, the range.

A config that constructs is one the trainer can run to the end without a silently wrong number
(a negative final learning rate, a checkpoint interval of 0), so every dataclass of settings
(``SAEConfig``, ``TrainConfig``, the objectives) calls ``check`` on each field in ``__post_init__``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Callable

__all__ = ["check", "integer", "real"]


def check(owner: object, name: str, ok: Callable[[Any], bool], valid: str) -> None:
    """Raise ``ValueError("Owner.name = value is invalid: valid")`` unless ``ok(owner.name)``."""
    value = getattr(owner, name)
    if not ok(value):
        raise ValueError(f"{type(owner).__name__}.{name} = {value!r} is invalid: {valid}")


def integer(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    """An int (not a bool) in [low, high]."""
    return lambda v: isinstance(v, Integral) and not isinstance(v, bool) and low <= v <= high


def real(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
         high_open: bool = False) -> Callable[[Any], bool]:
    """A finite number in the interval from low to high (each end closed unless ``*_open``)."""
    def ok(v: Any) -> bool:
        if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return ok
