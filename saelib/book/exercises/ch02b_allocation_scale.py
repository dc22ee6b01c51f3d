"""Chapter 2b's exercises (allocation at scale): whether a gap to the baseline closes, and when a
training history first reaches a level."""

from __future__ import annotations

from typing import Any, Callable

from saelib.book.exercises.harness import Case, run_cases

__all__ = ["check_gap_trend", "check_first_tokens_at"]


def check_gap_trend(fn: Callable[[Any, float], Any]) -> bool:
    """Check ``fn(ratios, tolerance) -> str``: "closes", "stays" or "widens" for ratios to a baseline
    at increasing training lengths. Compared with ``saelib.studies.scaling.gap_trend``."""
    from saelib.studies.scaling import gap_trend

    cases = [Case("a gap of 12% shrinking to 3%", ([1.12, 1.08, 1.03], 0.02)),
             Case("a gap of 3% growing to 9%", ([1.03, 1.05, 1.09], 0.02)),
             Case("12% to 11%: within the tolerance", ([1.12, 1.10, 1.11], 0.02)),
             Case("worse than the baseline, then better (crosses 1)", ([1.08, 1.0, 0.95], 0.02)),
             Case("better than the baseline by 5%, then by 10% (a gap in its favour widens)",
                  ([0.95, 0.92, 0.90], 0.02)),
             Case("only the first and the last value count", ([1.10, 1.50, 1.10], 0.02)),
             Case("a wider tolerance turns 'closes' into 'stays'", ([1.12, 1.08], 0.05)),
             Case("two values, equal", ([1.0, 1.0], 0.02))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = gap_trend(*case.args)
        return [] if got == expected else [f"ratios {case.args[0]}: got {got!r}, expected {expected!r}"]

    return run_cases("gap_trend", fn, cases, compare)


def check_first_tokens_at(fn: Callable[[Any, str, str, float], Any]) -> bool:
    """Check ``fn(history, sae, column, level) -> int | None``: training tokens at the first logged
    step where ``column`` of that SAE reached ``level``. Compared with
    ``saelib.studies.scaling.first_tokens_at``."""
    import pandas as pd

    from saelib.studies.scaling import first_tokens_at

    history = pd.DataFrame({
        "sae": ["topk", "mc"] * 5,
        "tokens": [t for t in (1000, 2000, 3000, 4000, 5000) for _ in range(2)],
        "dead_frac": [0.0, 0.0, 0.004, 0.02, 0.01, 0.0, 0.03, 0.0, 0.008, 0.0],
        "nmse": [0.9, 0.95, 0.5, 0.6, 0.3, 0.4, 0.25, 0.35, 0.2, 0.3]})
    cases = [Case("TopK first reaches 1% dead exactly at the level (>=)", (history, "topk", "dead_frac", 0.01)),
             Case("MC reaches 1% between two other SAEs' rows", (history, "mc", "dead_frac", 0.01)),
             Case("a level never reached (None)", (history, "topk", "dead_frac", 0.5)),
             Case("reached, then falling below again: the first time counts", (history, "topk", "dead_frac", 0.005)),
             Case("reached at the first logged step", (history, "mc", "nmse", 0.9))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = first_tokens_at(*case.args)
        return [] if got == expected and (got is None) == (expected is None) else [
            f"SAE {case.args[1]!r}, {case.args[2]} >= {case.args[3]}: got {got!r}, expected {expected!r}"]

    return run_cases("first_tokens_at", fn, cases, compare)
