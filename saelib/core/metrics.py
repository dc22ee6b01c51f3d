"""Standard SAE metrics, evaluated in inference mode over a window of tokens."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from saelib.core.devices import to_device_of
from saelib.core.losses import nmse
from saelib.core.progress import bar as progress_bar
from saelib.core.sae import SAE


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - total variance of the residual / total variance of x (per-dimension variances summed)."""
    return float(1 - (x - x_hat).var(0).sum() / x.var(0).sum())


def per_token_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error of each token relative to the mean squared deviation of a token from the mean:
    averages to the NMSE over the batch."""
    return (x_hat - x).pow(2).sum(1) / (x - x.mean(0)).pow(2).sum(1).mean()


@dataclass
class Evaluation:
    n_tokens: int
    l0: float
    """Mean active features per token."""
    l0_per_token: Tensor
    nmse: float
    explained_variance: float
    density: Tensor
    """Fraction of the window's tokens each feature fired on."""
    per_token_error: Tensor

    @property
    def dead(self) -> int:
        """Features that never fired in the window."""
        return int((self.density == 0).sum())

    @property
    def alive(self) -> int:
        return int((self.density > 0).sum())

    @property
    def dead_frac(self) -> float:
        return self.dead / len(self.density)


@torch.no_grad()
def evaluate(sae: SAE, data, n_tokens: int | None = None, batch_size: int = 4096,
             start: int = 0, progress: bool = False, batch_allocation: bool = False) -> Evaluation:
    """Metrics over rows [start, start + n_tokens) of an activation table.

    By default in inference mode (batch-level rules encode each token by their tracked thresholds).
    ``batch_allocation`` instead lets FC and MC allocate their budget within each batch of
    ``batch_size`` tokens, as in training (on a copy, so the SAE's running statistics are untouched).
    NMSE and explained variance are pooled over the whole window (mean of the window, not of
    each batch)."""
    n_tokens = min(n_tokens or len(data), len(data) - start)
    if n_tokens <= 0:
        raise ValueError(f"no tokens to evaluate (table has {len(data)} rows, start={start})")
    was_training = sae.training
    if batch_allocation:
        sae = copy.deepcopy(sae).train()
    else:
        sae.eval()
    fires = torch.zeros(sae.cfg.d_sae)
    l0s, sq_err, xs_sum, xs_sq, errs = [], 0.0, 0.0, 0.0, []
    resid_sum, resid_sq = 0.0, 0.0
    for lo in progress_bar(range(start, start + n_tokens, batch_size), show=progress, desc="evaluating"):
        x = to_device_of(data[torch.arange(lo, min(lo + batch_size, start + n_tokens))], sae).float()
        out = sae(x)
        fires += out.codes.fire_counts().cpu()
        l0s.append(out.codes.l0_per_token().cpu())
        resid = x - out.x_hat
        sq_err += float(resid.pow(2).sum())
        # The per-dimension sums stay on the SAE's device (one copy at the end, not one per batch).
        xs_sum, xs_sq = xs_sum + x.double().sum(0), xs_sq + x.double().pow(2).sum(0)
        resid_sum, resid_sq = resid_sum + resid.double().sum(0), resid_sq + resid.double().pow(2).sum(0)
        errs.append(resid.pow(2).sum(1).cpu())
    sae.train(was_training)
    var_x = float((xs_sq - xs_sum**2 / n_tokens).sum())
    var_resid = float((resid_sq - resid_sum**2 / n_tokens).sum())
    l0_per_token = torch.cat(l0s)
    return Evaluation(
        n_tokens=n_tokens,
        l0=float(l0_per_token.float().mean()),
        l0_per_token=l0_per_token,
        nmse=float(sq_err / var_x),
        explained_variance=float(1 - var_resid / var_x),
        density=fires / n_tokens,
        per_token_error=torch.cat(errs) / (var_x / n_tokens),
    )


@dataclass
class ZipfFit:
    exponent: float
    """s in density(rank) = C * rank ** -s."""
    log10_scale: float
    """log10 C."""
    r2: float
    """Coefficient of determination of the straight-line fit on log-log axes."""
    n_features: int
    """Features used (those with nonzero density within the rank range)."""


def zipf_fit(density: Tensor | np.ndarray, rank_range: tuple[int, int] | None = None) -> ZipfFit:
    """Least-squares line through log10(density) vs log10(rank) of the sorted nonzero densities
    (ranks start at 1). ``rank_range`` = (first, last) rank to fit, to exclude e.g. the low tail."""
    d = np.sort(np.asarray(density, dtype=np.float64))[::-1]
    ranks = np.arange(1, len(d) + 1)
    keep = d > 0
    if rank_range is not None:
        keep &= (ranks >= rank_range[0]) & (ranks <= rank_range[1])
    if keep.sum() < 3:
        raise ValueError(f"need at least 3 features with nonzero density to fit Zipf, got {keep.sum()}")
    lx, ly = np.log10(ranks[keep]), np.log10(d[keep])
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + slope * lx
    r2 = 1 - ((ly - pred) ** 2).sum() / ((ly - ly.mean()) ** 2).sum()
    return ZipfFit(float(-slope), float(intercept), float(r2), int(keep.sum()))


def frontier_at(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Where a family of SAEs (one point (xs[i], ys[i]) per sparsity) is at ``x``: log y interpolated
    linearly in log x between the family's points; nan outside their x range (no extrapolation).
    E.g. the NMSE a family reaches at an L0, or the L0 it needs for a CE-loss increase."""
    order = np.argsort(xs)
    lx = np.log(np.asarray(xs, dtype=np.float64)[order])
    ly = np.log(np.asarray(ys, dtype=np.float64)[order])
    if not lx[0] <= np.log(x) <= lx[-1]:
        return float("nan")
    return float(np.exp(np.interp(np.log(x), lx, ly)))


def max_cosine(directions: Tensor, dictionary: Tensor) -> Tensor:
    """For each row of ``directions``, its largest cosine similarity with any row of ``dictionary``."""
    a = directions / directions.norm(dim=1, keepdim=True)
    b = dictionary / dictionary.norm(dim=1, keepdim=True)
    return (a @ b.T).max(1).values


def nmse_of(sae: SAE, x: Tensor) -> float:
    """NMSE of an SAE on one batch, in inference mode."""
    return float(nmse(x, sae.reconstruct(x)))
