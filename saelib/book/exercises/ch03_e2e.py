"""Chapter 3's exercises (end-to-end dictionary learning): the e2e KL loss and the largest cosine
within one dictionary."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from saelib.book.exercises.harness import Case, as_float, is_close, run_cases

__all__ = ["check_e2e_kl", "check_max_cosine_within"]


def check_e2e_kl(fn: Callable[[Tensor, Tensor], Any]) -> bool:
    """Check ``fn(clean_logits, spliced_logits) -> float``: KL(clean || spliced) of the next-token
    distributions, summed over the vocabulary and averaged over every position of every window
    (Braun et al.'s e2e loss, ``kl_div(..., reduction="batchmean")`` on flattened positions)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 5, 11, generator=gen) * 2

    def reference(a: Tensor, b: Tensor) -> float:
        return float(F.kl_div(b.flatten(0, -2).log_softmax(-1), a.flatten(0, -2).log_softmax(-1),
                              log_target=True, reduction="batchmean"))

    cases = [Case("random logits, 3 windows x 5 positions x 11 tokens",
                  (clean, clean + torch.randn(3, 5, 11, generator=gen))),
             Case("identical logits (KL 0)", (clean, clean.clone())),
             Case("logits shifted by a constant per position (the same distribution: KL 0)",
                  (clean, clean + torch.randn(3, 5, 1, generator=gen) * 5)),
             Case("a confident clean model against a uniform spliced one (KL(clean||spliced), not the reverse)",
                  (clean * 5, torch.zeros_like(clean))),
             Case("one window of one position", (clean[:1, :1], clean[:1, :1] + 1 - 2 * (clean[:1, :1] > 0)))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = reference(*case.args)
        value = as_float(got)
        if is_close(value, expected, rtol=1e-4, atol=1e-6):
            return []
        swapped = reference(*reversed(case.args))
        summed = expected * case.args[0].shape[:-1].numel()
        hint = (" (that is KL(spliced || clean): the clean distribution is the reference)"
                if is_close(value, swapped, rtol=1e-4) else
                " (that is the sum over positions: average it)" if is_close(value, summed, rtol=1e-4) else "")
        return [f"got {value:.6f}, expected {expected:.6f}{hint}"]

    return run_cases("e2e KL loss", fn, cases, compare)


def check_max_cosine_within(fn: Callable[[Tensor], Any]) -> bool:
    """Check ``fn(directions) -> Tensor``: for each row, the largest cosine with any *other* row of
    the same matrix. Compared with ``saelib.studies.matching.max_cosine_within``."""
    from saelib.studies.matching import max_cosine_within

    gen = torch.Generator().manual_seed(0)
    d = torch.randn(30, 8, generator=gen)
    dup = torch.cat([d[:10], d[:3] * 4.0])  # rows 10-12 repeat rows 0-2, scaled
    cases = [Case("random directions, 30 rows of width 8", (d,)),
             Case("rows 10-12 repeat rows 0-2 scaled by 4 (cosine 1 for those six)", (dup,)),
             Case("a row and its negative only (cosine -1: the largest other is still -1)",
                  (torch.stack([d[0], -d[0]]),)),
             Case("more rows than dimensions: 40 rows of width 3", (torch.randn(40, 3, generator=gen),))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = max_cosine_within(*case.args)
        got = torch.as_tensor(np.asarray(got, dtype=np.float64)).float()
        if got.shape != expected.shape:
            return [f"expected one value per row, shape {tuple(expected.shape)}, got {tuple(got.shape)}"]
        problems = []
        for i in range(len(expected)):
            if not is_close(float(got[i]), float(expected[i]), rtol=1e-4, atol=1e-5):
                why = " (a row is always cosine 1 with itself: leave it out)" if is_close(float(got[i]), 1.0) else ""
                problems.append(f"row {i}: got {float(got[i]):.4f}, expected {float(expected[i]):.4f}{why}")
        return problems

    return run_cases("max cosine within a dictionary", fn, cases, compare)
