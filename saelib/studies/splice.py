"""Splice an SAE into its subject model and measure what the model loses.

Reconstruction error (NMSE) says how far x_hat is from x; it does not say whether the model still
works when it reads x_hat. ``splice_metrics`` replaces the activation at the SAE's hook with its
reconstruction and compares next-token predictions with the clean run: the cross-entropy increase,
the KL divergence from the clean predictions (and the zero-ablated run's, its reference), and the
fraction of the CE gap to zero-ablating the hook that the SAE recovers. ``downstream_errors``
measures how far the later residual streams move (Braun et al.'s downstream reconstruction).
Evaluate on held-out text (``token_windows(..., split="heldout")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from saelib.core.devices import to_device_of
from saelib.core.hooks import check_hook_point, later_residual_streams
from saelib.core.progress import bar as progress_bar

__all__ = ["SpliceResult", "splice_metrics", "splice_sweep", "downstream_errors"]


@dataclass(frozen=True)
class SpliceResult:
    """Mean next-token losses (nats/token) over every predicted position of the windows."""

    ce_clean: float
    """Cross-entropy of the unmodified model."""
    ce_spliced: float
    """Cross-entropy with the hook activation replaced by its reconstruction."""
    kl: float
    """Mean KL(clean || spliced) of the next-token distributions."""
    ce_zero_ablation: float
    """Cross-entropy with the hook activation set to zero: the reference for a useless SAE."""
    kl_zero_ablation: float
    """Mean KL(clean || zero-ablated): the KL reference for a useless SAE."""
    n_tokens: int
    """Predicted positions averaged over."""

    @property
    def ce_increase(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def fraction_recovered(self) -> float:
        """1 for a perfect SAE, 0 for one no better than zero-ablation (can leave [0, 1])."""
        return (self.ce_zero_ablation - self.ce_spliced) / (self.ce_zero_ablation - self.ce_clean)


def _as_function(reconstruct) -> Callable[[Tensor], Tensor]:
    # An saelib SAE (its .reconstruct switches to inference mode and runs on its device), or x -> x_hat.
    fn = getattr(reconstruct, "reconstruct", reconstruct)
    if not callable(fn):
        raise TypeError(f"reconstruct must be an SAE or a callable x -> x_hat, got {type(reconstruct).__name__}")
    return fn


def _replace(fn: Callable[[Tensor], Tensor], first: int, max_norm: float | None = None):
    def hook(act: Tensor, hook=None) -> Tensor:
        x = act[:, first:]
        x_hat = fn(x)
        if x_hat.shape != x.shape:
            raise ValueError(f"reconstruct returned shape {tuple(x_hat.shape)} for input {tuple(x.shape)}")
        x_hat = x_hat.to(act.dtype)
        if max_norm is not None:
            x_hat = torch.where(x.norm(dim=-1, keepdim=True) > max_norm, x, x_hat)
        return torch.cat([act[:, :first], x_hat], dim=1)

    return hook


def splice_metrics(model, hook: str, reconstruct, windows: Tensor, batch_size: int = 8,
                   exclude_bos: bool = True, progress: bool = False, max_norm: float | None = None
                   ) -> SpliceResult:
    """Clean, spliced and zero-ablated next-token losses of ``model`` on ``windows`` [n, ctx].

    ``reconstruct`` is an SAE trained on ``hook`` or any function x -> x_hat on [..., d] tensors.
    With ``exclude_bos`` position 0 keeps its original activation in both modified runs, as the
    SAEs never saw BOS activations (see ``saelib.subjects.activations``); likewise, with ``max_norm``, so
    do positions whose activation norm exceeds it (the rows ``drop_norm_outliers`` removed from the
    SAEs' data). An identity ``reconstruct`` reproduces the clean run exactly."""
    return splice_sweep(model, hook, {"sae": reconstruct}, windows, batch_size, exclude_bos, progress,
                        max_norm)["sae"]


@torch.no_grad()
def splice_sweep(model, hook: str, reconstructs: Mapping[str, object], windows: Tensor, batch_size: int = 8,
                 exclude_bos: bool = True, progress: bool = False, max_norm: float | None = None
                 ) -> dict[str, SpliceResult]:
    """``splice_metrics`` for several SAEs of one hook, sharing the clean and zero-ablated runs."""
    check_hook_point(model, hook)
    first = int(exclude_bos)
    replace = {name: _replace(_as_function(r), first, max_norm) for name, r in reconstructs.items()}
    zero = _replace(torch.zeros_like, first, max_norm)
    clean_sums = torch.zeros(3, dtype=torch.float64)  # ce clean, ce zero, kl zero
    spliced_sums = {name: torch.zeros(2, dtype=torch.float64) for name in replace}  # ce spliced, kl
    n = 0
    for lo in progress_bar(range(0, len(windows), batch_size), show=progress, desc="splicing", unit="batch"):
        tokens = to_device_of(windows[lo:lo + batch_size], model)
        target = tokens[:, 1:].reshape(-1)

        def log_probs(hooks):
            return model.run_with_hooks(tokens, fwd_hooks=hooks)[:, :-1].log_softmax(-1).flatten(0, 1)

        clean = log_probs([])
        zeroed = log_probs([(hook, zero)])
        clean_sums += torch.stack([F.nll_loss(clean, target, reduction="sum"),
                                   F.nll_loss(zeroed, target, reduction="sum"),
                                   F.kl_div(zeroed, clean, log_target=True, reduction="sum")]).double().cpu()
        for name, fn in replace.items():
            spliced = log_probs([(hook, fn)])
            spliced_sums[name] += torch.stack([F.nll_loss(spliced, target, reduction="sum"),
                                               F.kl_div(spliced, clean, log_target=True, reduction="sum")
                                               ]).double().cpu()
        n += len(target)
    ce_clean, ce_zero, kl_zero = (clean_sums / n).tolist()
    results = {}
    for name, sums in spliced_sums.items():
        ce_spliced, kl = (sums / n).tolist()
        results[name] = SpliceResult(ce_clean=ce_clean, ce_spliced=ce_spliced, kl=kl, ce_zero_ablation=ce_zero,
                                     kl_zero_ablation=kl_zero, n_tokens=n)
    return results


@torch.no_grad()
def downstream_errors(model, hook: str, reconstructs: Mapping[str, object], windows: Tensor,
                      hooks: Sequence[str] | None = None, batch_size: int = 8, exclude_bos: bool = True,
                      progress: bool = False) -> pd.DataFrame:
    """How far each SAE's splice at ``hook`` moves the later residual streams of ``model``.

    ``hooks``: where to compare (default: every ``blocks.k.hook_resid_pre`` after the SAE's layer and
    the last block's ``hook_resid_post``). One row per (sae, hook): ``mse`` (mean over positions 1..
    and dimensions, the activations' own units) and ``explained_variance`` (1 - squared error /
    the clean activations' variance about their mean, pooled over all windows)."""
    check_hook_point(model, hook)
    hooks = list(hooks) if hooks is not None else later_residual_streams(model, hook)
    for h in hooks:
        check_hook_point(model, h)
    first = int(exclude_bos)
    replace = {name: _replace(_as_function(r), first) for name, r in reconstructs.items()}
    # Per hook: clean sum, clean sum of squares (float64), and per SAE the squared error sum.
    d = model.cfg.d_model
    clean_sum = {h: torch.zeros(d, dtype=torch.float64) for h in hooks}
    clean_sq = {h: torch.zeros((), dtype=torch.float64) for h in hooks}
    err = {(name, h): torch.zeros((), dtype=torch.float64) for name in replace for h in hooks}
    n = 0
    for lo in progress_bar(range(0, len(windows), batch_size), show=progress, desc="downstream", unit="batch"):
        tokens = to_device_of(windows[lo:lo + batch_size], model)
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
        clean = {h: cache[h][:, 1:].double().flatten(0, 1) for h in hooks}
        for h in hooks:
            clean_sum[h] += clean[h].sum(0).cpu()
            clean_sq[h] += clean[h].pow(2).sum().cpu()
        for name, fn in replace.items():
            seen: dict[str, Tensor] = {}

            def keep(act: Tensor, hook) -> None:
                seen[hook.name] = act[:, 1:].double().flatten(0, 1)

            model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)] + [(h, keep) for h in hooks])
            for h in hooks:
                err[name, h] += (seen[h] - clean[h]).pow(2).sum().cpu()
        n += clean[hooks[0]].shape[0]
    rows = []
    for (name, h), e in err.items():
        variance = clean_sq[h] - clean_sum[h].pow(2).sum() / n
        rows.append({"sae": name, "hook": h, "mse": float(e / (n * d)),
                     "explained_variance": float(1 - e / variance)})
    return pd.DataFrame(rows)
