"""A chapter's claims table: each claim of a paper beside the number this run measured.

Every chapter ends with such a table and asserts it against its profile's ``expect_claims``, so a
change of saelib or of a setting that flips a result fails the build. The prose's verdict words
("do not beat", "holds") come from the same table (``words``, glued by ``saelib.book.prose``), so no
run's text can contradict its own claims.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import pandas as pd


class Claim(NamedTuple):
    name: str
    """Short identifier, the key in ``expect_claims``."""
    says: str
    """What the paper claims, in words."""
    ours: str
    """The number this run measured, formatted."""
    holds: bool
    """Whether the claim holds in this run."""


def table(claims: Sequence[Claim]) -> pd.DataFrame:
    """The claims as a frame indexed by name: the paper says, ours, holds here."""
    frame = pd.DataFrame([(c.name, c.says, c.ours, bool(c.holds)) for c in claims],
                         columns=["claim", "the paper says", "ours", "holds here"])
    return frame.set_index("claim")


def check(claims: pd.DataFrame, expected: Mapping[str, bool] | None) -> None:
    """Raise if any claim's outcome differs from ``expected`` (None: nothing recorded for this profile)."""
    if expected is None:
        return
    unknown = sorted(set(expected) - set(claims.index))
    if unknown:
        raise KeyError(f"expect_claims names claims this chapter does not make: {unknown}; "
                       f"its claims: {list(claims.index)}")
    observed = claims["holds here"].to_dict()
    changed = {c: observed[c] for c, want in expected.items() if observed[c] != want}
    assert not changed, f"claims that changed outcome (observed here): {changed}; the text expects {dict(expected)}"


def words(claims: pd.DataFrame, phrases: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """The prose's words for the claims' outcomes in this run: ``phrases[claim]`` is (the words if it
    holds, the words if it does not), e.g. ``{"mc_beats_topk": ("beats", "does not beat")}`` gives
    ``{"mc_beats_topk": "does not beat"}`` where MC lost. Glue them (``saelib.book.prose.glue``)."""
    unknown = sorted(set(phrases) - set(claims.index))
    if unknown:
        raise KeyError(f"no such claims: {unknown}; this chapter's: {list(claims.index)}")
    return {name: yes if bool(claims.loc[name, "holds here"]) else no for name, (yes, no) in phrases.items()}
