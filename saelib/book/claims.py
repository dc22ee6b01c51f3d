"""A chapter's claims table: each claim of a paper beside the number this run measured.

Every chapter ends with such a table and asserts it against its profile's ``expect_claims`` (what
the chapter's prose says for that profile), so a change of saelib or of a setting that flips a
result fails the build rather than silently contradicting the text.

A claim is either judged directly (``holds``: True or False) or measured as a difference beside
its noise floor (``difference``, ``noise_floor``), which gives a three-way verdict: it holds when
the difference is above the floor, fails when it is below minus the floor and is
``INCONCLUSIVE`` in between, whatever the sign (``verdict``). A profile expects True, False or
``INCONCLUSIVE``: an expected True or False must be observed exactly (an inconclusive result
fails it: the text would assert a verdict the run does not support); an expected
``INCONCLUSIVE`` means the text asserts no direction (its prose is glued from the verdict), so any
outcome passes and one beyond the floor is only reported.

The prose's verdict words ("do not beat", "holds") come from the same table (``words``, glued by
``saelib.book.prose``), so no run's text can contradict its own claims.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, Union

import pandas as pd

INCONCLUSIVE = "inconclusive"
Verdict = Union[bool, Literal["inconclusive"]]


def verdict(difference: float, noise_floor: float) -> Verdict:
    """True if ``difference`` > ``noise_floor``, False if it is < -``noise_floor``, else
    ``INCONCLUSIVE``: a difference no larger than the noise says nothing, whatever its sign."""
    if not noise_floor >= 0:  # also refuses NaN, which would make every claim inconclusive
        raise ValueError(f"a noise floor must be a non-negative number, got {noise_floor!r}")
    if math.isnan(difference):
        raise ValueError("the difference is NaN: nothing was measured")
    if abs(difference) <= noise_floor:
        return INCONCLUSIVE
    return bool(difference > 0)


def across(differences: Sequence[float], noise_floors: Sequence[float] | None = None) -> tuple[float, float]:
    """One (difference, noise floor) for a claim measured several times (seeds, tasks, matching
    thresholds): the centre and half-width of the smallest interval holding every ``difference +-
    noise_floor`` (no floors: each measurement exact). Its ``verdict`` is True only if every
    measurement is above its floor, False only if every one is below minus its floor, and
    ``INCONCLUSIVE`` otherwise: ``verdict(*across(margins))`` is a verdict that must not hinge on
    the setting."""
    differences = [float(d) for d in differences]
    noise_floors = [0.0] * len(differences) if noise_floors is None else list(noise_floors)
    if len(differences) != len(noise_floors) or not differences:
        raise ValueError(f"need as many noise floors as differences, at least one: got "
                         f"{len(differences)} and {len(noise_floors)}")
    for d, f in zip(differences, noise_floors):
        verdict(d, f)  # refuses NaN and negative floors
    low = min(d - f for d, f in zip(differences, noise_floors))
    high = max(d + f for d, f in zip(differences, noise_floors))
    return (low + high) / 2, (high - low) / 2


@dataclass(frozen=True)
class Claim:
    """One claim: judged directly (``holds``) or measured (``difference`` beside ``noise_floor``)."""

    name: str
    """Short identifier, the key in ``expect_claims``."""
    says: str
    """What the paper claims, in words."""
    ours: str
    """The number this run measured, formatted."""
    holds: Verdict | None = None
    """Whether the claim holds in this run, for a claim judged without a noise floor: True, False,
    or ``INCONCLUSIVE`` where its measurements disagree (``across``)."""
    difference: float | None = None
    """The measured difference that is positive where the claim holds (with ``noise_floor``)."""
    noise_floor: float | None = None
    """How large ``difference`` can be from noise alone, in its units."""

    def __post_init__(self) -> None:
        measured = (self.difference is not None, self.noise_floor is not None)
        if measured[0] != measured[1]:
            raise ValueError(f"claim {self.name!r}: give both difference and noise_floor, or neither")
        if measured[0] == (self.holds is not None):
            raise ValueError(f"claim {self.name!r}: give either holds or difference and noise_floor")

    @property
    def verdict(self) -> Verdict:
        """True, False or ``INCONCLUSIVE`` (the last only for a measured claim)."""
        if self.holds is not None:
            return INCONCLUSIVE if self.holds == INCONCLUSIVE else bool(self.holds)
        return verdict(self.difference, self.noise_floor)


def table(claims: Sequence[Claim]) -> pd.DataFrame:
    """The claims as a frame indexed by name: the paper says, ours, holds here (True, False or
    "inconclusive"), and, where some claim is measured against a noise floor, its difference and
    floor (blank for the others)."""
    rows = [(c.name, c.says, c.ours, c.verdict) for c in claims]
    frame = pd.DataFrame(rows, columns=["claim", "the paper says", "ours", "holds here"])
    if any(c.noise_floor is not None for c in claims):
        frame["difference"] = [math.nan if c.difference is None else c.difference for c in claims]
        frame["noise floor"] = [math.nan if c.noise_floor is None else c.noise_floor for c in claims]
    return frame.set_index("claim")


def check(claims: pd.DataFrame, expected: Mapping[str, Verdict] | None) -> None:
    """Raise if any claim's outcome differs from ``expected`` (None: nothing recorded for this
    profile). An expected ``INCONCLUSIVE`` accepts every outcome and warns on a definite one."""
    if expected is None:
        return
    unknown = sorted(set(expected) - set(claims.index))
    if unknown:
        raise KeyError(f"expect_claims names claims this chapter does not make: {unknown}; "
                       f"its claims: {list(claims.index)}")
    invalid = {c: want for c, want in expected.items() if want not in (True, False, INCONCLUSIVE)}
    if invalid:
        raise ValueError(f"expect_claims values must be True, False or {INCONCLUSIVE!r}: {invalid}")
    observed = claims["holds here"].to_dict()
    definite = {c: observed[c] for c, want in expected.items()
                if want == INCONCLUSIVE and observed[c] != INCONCLUSIVE}
    if definite:
        warnings.warn(f"claims beyond their noise floor that the text leaves inconclusive: {definite}",
                      stacklevel=2)
    changed = {c: observed[c] for c, want in expected.items()
               if want != INCONCLUSIVE and observed[c] != want}
    assert not changed, f"claims that changed outcome (observed here): {changed}; the text expects {dict(expected)}"


def words(claims: pd.DataFrame, phrases: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """The prose's words for the claims' outcomes in this run: ``phrases[claim]`` is (the words if it
    holds, the words if it does not), e.g. ``{"mc_beats_topk": ("beats", "does not beat")}`` gives
    ``{"mc_beats_topk": "does not beat"}`` where MC lost. Glue them (``saelib.book.prose.glue``)."""
    unknown = sorted(set(phrases) - set(claims.index))
    if unknown:
        raise KeyError(f"no such claims: {unknown}; this chapter's: {list(claims.index)}")
    return {name: yes if bool(claims.loc[name, "holds here"]) else no for name, (yes, no) in phrases.items()}
