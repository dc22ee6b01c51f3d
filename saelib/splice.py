"""Splice an SAE into its subject model and measure what the model loses.

Reconstruction error (NMSE) says how far x_hat is from x; it does not say whether the model still
works when it reads x_hat. ``splice_metrics`` replaces the activation at the SAE's hook with its
reconstruction and compares next-token predictions with the clean run: the cross-entropy increase,
the KL divergence from the clean predictions, and the fraction of the CE gap to zero-ablating the
hook that the SAE recovers. Evaluate on held-out text (``token_windows(..., split="heldout")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saelib.subject_models import check_hook_point

__all__ = ["SpliceResult", "splice_metrics"]


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
    # An saelib SAE (or anything with .reconstruct, which switches to inference mode), or x -> x_hat.
    fn = getattr(reconstruct, "reconstruct", reconstruct)
    if not callable(fn):
        raise TypeError(f"reconstruct must be an SAE or a callable x -> x_hat, got {type(reconstruct).__name__}")
    return fn


def _replace(fn: Callable[[Tensor], Tensor], first: int):
    def hook(act: Tensor, hook=None) -> Tensor:
        x_hat = fn(act[:, first:])
        if x_hat.shape != act[:, first:].shape:
            raise ValueError(f"reconstruct returned shape {tuple(x_hat.shape)} for input {tuple(act[:, first:].shape)}")
        return torch.cat([act[:, :first], x_hat.to(act.dtype)], dim=1)

    return hook


@torch.no_grad()
def splice_metrics(model, hook: str, reconstruct, windows: Tensor, batch_size: int = 8,
                   exclude_bos: bool = True, progress: bool = False) -> SpliceResult:
    """Clean, spliced and zero-ablated next-token losses of ``model`` on ``windows`` [n, ctx].

    ``reconstruct`` is an SAE trained on ``hook`` or any function x -> x_hat on [..., d] tensors.
    With ``exclude_bos`` position 0 keeps its original activation in both modified runs, as the
    SAEs never saw BOS activations (see ``saelib.activations``). An identity ``reconstruct``
    reproduces the clean run exactly."""
    check_hook_point(model, hook)
    fn = _as_function(reconstruct)
    first = int(exclude_bos)
    replace = _replace(fn, first)
    zero = _replace(torch.zeros_like, first)
    sums = torch.zeros(4, dtype=torch.float64)  # ce clean, ce spliced, kl, ce zero
    n = 0
    for lo in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="splicing", unit="batch"):
        tokens = windows[lo:lo + batch_size].to(model.cfg.device)
        target = tokens[:, 1:].reshape(-1)
        clean = model(tokens)[:, :-1].log_softmax(-1).flatten(0, 1)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, replace)])[:, :-1].log_softmax(-1).flatten(0, 1)
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])[:, :-1].log_softmax(-1).flatten(0, 1)
        kl = F.kl_div(spliced, clean, log_target=True, reduction="sum")
        sums += torch.stack([F.nll_loss(clean, target, reduction="sum"), F.nll_loss(spliced, target, reduction="sum"),
                             kl, F.nll_loss(zeroed, target, reduction="sum")]).double().cpu()
        n += len(target)
    ce_clean, ce_spliced, kl, ce_zero = (sums / n).tolist()
    return SpliceResult(ce_clean=ce_clean, ce_spliced=ce_spliced, kl=kl, ce_zero_ablation=ce_zero, n_tokens=n)
