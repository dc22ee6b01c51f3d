"""The check harness every chapter's exercises share: a check runs the learner's function on a list
of ``Case``s and compares each answer with saelib's own.

The convention, the same for every check:

* it returns ``True`` when every case agrees, so a notebook cell can ``assert check_x(my_x)``;
* otherwise it prints, in plain words, which case failed and how (which row or rank, expected
  against got) and returns ``False``; it never raises for a wrong answer, and a learner function
  that raises (the stub's ``NotImplementedError``) is reported the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import Tensor

__all__ = ["Case", "run_cases", "as_float", "is_close", "MAX_REPORTED"]

MAX_REPORTED = 6
"""Problems printed per failing case: enough to see the pattern, few enough to read."""


@dataclass
class Case:
    """One input the learner's function is run on; ``label`` says in words what it probes."""

    label: str
    args: tuple
    expected: Any = None
    """Precomputed reference answer, where computing it needs more than the arguments."""


def run_cases(name: str, fn: Callable, cases: list[Case], compare: Callable[[Case, Any], list[str]]) -> bool:
    """Run ``fn`` on every case and print the problems ``compare`` finds (expected vs got), for
    every failing case: which cases fail together often says more than the first failure alone."""
    fn_name = getattr(fn, "__name__", repr(fn))
    failed = 0
    for case in cases:
        try:
            got = fn(*case.args)
            problems = compare(case, got)
        except NotImplementedError:
            print(f"{fn_name} is not implemented yet (it raised NotImplementedError): fill in its body.")
            return False
        except Exception as e:  # the learner's bug, reported in words rather than as a traceback
            problems = [f"it raised {type(e).__name__}: {e}"]
        if problems:
            failed += 1
            print(f"{fn_name} is wrong on {case.label}:")
            for p in problems[:MAX_REPORTED]:
                print(f"  - {p}")
            if len(problems) > MAX_REPORTED:
                print(f"  ... and {len(problems) - MAX_REPORTED} more")
    if failed:
        print(f"{fn_name} fails {failed} of {len(cases)} cases.")
        return False
    print(f"{fn_name} agrees with saelib's {name} on all {len(cases)} cases: " + "; ".join(c.label for c in cases))
    return True


def as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def is_close(got: float, expected: float, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return bool(np.isfinite(got)) and abs(got - expected) <= atol + rtol * abs(expected)
