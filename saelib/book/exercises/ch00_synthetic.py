"""Chapter 0's exercises (SAEs on data with a known dictionary): TopK and Mutual Choice from
pre-activations, and NMSE."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from saelib.book.exercises.harness import Case, as_float, is_close, run_cases
from saelib.core.allocation import AllocationContext, selection_mask
from saelib.core.losses import nmse

__all__ = ["check_topk", "check_mutual_choice", "check_nmse"]


def _selection_cases(seed: int = 0) -> Iterator[tuple[str, Tensor, int]]:
    gen = torch.Generator().manual_seed(seed)
    yield "random 16 x 32 pre-activations, k = 4", torch.randn(16, 32, generator=gen), 4
    yield "ties (integer pre-activations), k = 3", torch.randint(-3, 4, (8, 12), generator=gen).float(), 3
    z = torch.randn(10, 20, generator=gen)
    z[[2, 5]] = -z[[2, 5]].abs() - 0.1
    z[7] = torch.where(torch.arange(20) < 2, 1.0 + torch.rand(20, generator=gen), -1.0)
    yield "rows 2 and 5 all negative, row 7 with 2 positive entries, k = 4", z, 4
    yield "k = d_sae = 10 (every positive entry is kept)", torch.randn(6, 10, generator=gen), 10
    yield "a batch of one token, k = 5", torch.randn(1, 20, generator=gen), 5


def _as_mask(got: Any, z: Tensor) -> Tensor:
    mask = torch.as_tensor(np.asarray(got)).bool()
    if mask.shape != z.shape:
        raise ValueError(f"expected a boolean mask of shape {tuple(z.shape)} (tokens x features), "
                         f"got shape {tuple(mask.shape)}")
    return mask


def _group_problems(where: str, z: Tensor, got: Tensor, budget: int, budget_text: str,
                    index: Callable[[int], str], ties_kept: int = 0) -> list[str]:
    """What is wrong with the entries ``got`` keeps from ``z`` (one row, or the whole matrix
    flattened): non-positive entries, a count other than min(budget, positive entries) (up to
    ``ties_kept`` when ties at the threshold may all be kept), a smaller entry kept over a larger
    one. Ties make several answers right, so values are compared, not positions."""
    problems = []
    bad = torch.nonzero(got & (z <= 0)).flatten().tolist()
    if len(bad) == 1:
        problems.append(f"{where} keeps {index(bad[0])} whose pre-activation {z[bad[0]]:.3g} is not positive")
    elif bad:
        problems.append(f"{where} keeps {len(bad)} entries whose pre-activations are not positive "
                        f"(e.g. {index(bad[0])}: {z[bad[0]]:.3g})")
    n, n_pos = int(got.sum()), int((z > 0).sum())
    n_min = min(budget, n_pos)
    n_max = max(n_min, ties_kept)
    if not n_min <= n <= n_max:
        why = (budget_text if n_pos >= budget else f"only {n_pos} of its entries are positive" if n_pos
               else "none of its entries is positive")
        expected = f"{n_min}" if n_min == n_max else f"{n_min} to {n_max} (ties at the threshold)"
        problems.append(f"{where} keeps {n} entr{'y' if n == 1 else 'ies'}, expected {expected} ({why})")
    kept, dropped = torch.nonzero(got).flatten(), torch.nonzero(~got & (z > 0)).flatten()
    if len(kept) and len(dropped):
        low, high = kept[z[kept].argmin()], dropped[z[dropped].argmax()]
        if z[high] > z[low]:
            problems.append(f"{where} keeps {index(int(low))} (z = {z[low]:.3g}) but drops the larger "
                            f"{index(int(high))} (z = {z[high]:.3g})")
    return problems


def check_topk(fn: Callable[[Tensor, int], Any]) -> bool:
    """Check ``fn(z, k) -> mask``: for each token (row) of the pre-activations ``z``, keep its k
    largest entries, and never a non-positive one. Compared with ``saelib.core.allocation.topk``."""

    def compare(case: Case, got: Any) -> list[str]:
        z, k = case.args
        mask = _as_mask(got, z)
        selection_mask("topk", z, AllocationContext(k=k))
        problems = []
        for r in range(len(z)):
            problems += _group_problems(f"row {r}", z[r], mask[r], k, f"k={k}", lambda i: f"feature {i}")
        return problems

    return run_cases("TopK", fn, [Case(label, (z, k)) for label, z, k in _selection_cases()], compare)


def check_mutual_choice(fn: Callable[[Tensor, int], Any]) -> bool:
    """Check ``fn(z, k) -> mask``: keep the k * n_tokens largest entries of the whole matrix, never
    a non-positive one. Compared with ``saelib.core.allocation.mutual_choice``, which keeps every entry
    tied with the last one kept; a learner may keep exactly the budget or the ties too."""

    def compare(case: Case, got: Any) -> list[str]:
        z, k = case.args
        mask = _as_mask(got, z)
        expected = selection_mask("mutual_choice", z, AllocationContext(k=k))
        n_cols = z.shape[1]
        return _group_problems("the batch", z.flatten(), mask.flatten(), k * len(z), f"k x tokens = {k} x {len(z)}",
                               lambda i: f"(token {i // n_cols}, feature {i % n_cols})", ties_kept=int(expected.sum()))

    return run_cases("Mutual Choice", fn, [Case(label, (z, k)) for label, z, k in _selection_cases(1)], compare)


# --------------------------------------------------------------------------- NMSE (chapter 0)

def check_nmse(fn: Callable[[Tensor, Tensor], Any]) -> bool:
    """Check ``fn(x, x_hat) -> float``: squared error over the squared deviation of x from its mean
    (the fraction of variance unexplained). Compared with ``saelib.core.losses.nmse``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    noisy = x + 0.3 * torch.randn(64, 8, generator=gen)
    shifted = 5.0 + torch.randn(64, 8, generator=gen)
    scales = torch.randn(32, 4, generator=gen) * torch.tensor([0.1, 1.0, 10.0, 100.0])
    cases = [
        Case("random x and a noisy reconstruction", (x, noisy)),
        Case("a perfect reconstruction (NMSE 0)", (x, x.clone())),
        Case("predicting the mean of x for every token (NMSE exactly 1)", (x, x.mean(0).expand_as(x).clone())),
        Case("x with mean 5 (the variance is around the mean, not around 0)", (shifted, shifted + 0.5)),
        Case("dimensions of very different scales", (scales, scales * 0.9)),
        Case("a batch of two tokens", (x[:2], noisy[:2])),
    ]

    def compare(case: Case, got: Any) -> list[str]:
        expected = float(nmse(*case.args))
        value = as_float(got)
        return [] if is_close(value, expected) else [f"got {value:.6g}, expected {expected:.6g}"]

    return run_cases("NMSE", fn, cases, compare)
