"""What an SAE minimises. The trainer (``saelib.core.training``) is the same for every objective.

* ``Reconstruction`` (the default; chapters 0, 2 and 4): NMSE + l1_coeff * L1 + the aux loss, as
  configured in each ``SAEConfig`` (``saelib.core.losses.sae_loss``).
* Braun et al. (2024)'s three objectives (chapter 3), in the paper's names and normalisation:

      local:   MSE(a, a_hat)                                   + phi * ||c||_1
      e2e:     kl_coeff * KL(y, y_hat)                         + phi * ||c||_1
      e2e_ds:  kl_coeff * KL(y, y_hat) + ds_coeff / |D| * sum_{k in D} MSE(a_k, a_hat_k) + phi * ||c||_1

  phi = l1_coeff / d_in (the SAE config's l1_coeff is the paper's lambda); ||c||_1 is averaged over
  tokens; MSE averages over tokens and dimensions; KL(clean || spliced) of the next-token
  distributions, averaged over tokens (``kl_div(..., reduction="batchmean")``); D is the list of
  later residual streams (by default every ``blocks.k.hook_resid_pre`` after the SAE's layer, as the
  paper's e2e+ds runs, or the last block's output where no block input follows). TopK and the
  other rules have no L1 term (``l1_coeff=0``) and keep their aux loss.

  Every term is in the activations' own units, as in the paper: a (normalize_input) SAE's codes
  count as c / input_scale, what they would be for the same SAE written without the scaling. So
  ``normalize_input`` only reparametrises the SAE (it conditions the optimisation) and the
  coefficients mean what the paper's mean.

The e2e objectives read *windows* of activations at the SAE's hook, [windows, ctx, d_in]
(``saelib.subjects.activations.WindowTable``): the SAE's reconstruction replaces positions 1.. (BOS keeps its
activation, as in ``saelib.studies.splice``) and the frozen model runs from the SAE's layer to the logits
(TransformerLens ``start_at_layer``), once clean and once spliced. The clean run is shared by every
SAE of a step. The model never receives a gradient: its parameters are frozen while an objective
holds it, and only the SAE's parameters are in the optimiser.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from saelib.core import distributed
from saelib.core.hooks import later_residual_streams, parse_hook
from saelib.core.losses import LossTerms, sae_loss
from saelib.core.sae import PRECISIONS, SAE, SAEOutput
from saelib.core.validate import check, real

__all__ = ["Objective", "Reconstruction", "Local", "E2E", "token_rows"]


class Objective(Protocol):
    """Anything that turns (SAE, batch) into loss terms; ``config()`` identifies it in checkpoints
    and cache keys, so a run is never resumed or reloaded under another objective."""

    def config(self) -> dict: ...

    def loss(self, sae: SAE, batch: Tensor, shared: dict) -> tuple[LossTerms, SAEOutput]:
        """``shared`` is a fresh dict per training step, the same for every SAE of the step: what an
        objective computes once per batch (the clean model run) goes there."""
        ...


def token_rows(batch: Tensor) -> Tensor:
    """The rows an SAE reads from a batch: token rows [tokens, d] as they are, or positions 1.. of
    windows [windows, ctx, d] (BOS excluded, as in every activation cache of the book)."""
    return batch if batch.ndim == 2 else batch[:, 1:].reshape(-1, batch.shape[-1])


class Reconstruction:
    """saelib's reconstruction objective: NMSE + l1_coeff * L1 + aux (``saelib.core.losses.sae_loss``)."""

    def config(self) -> dict:
        return {"objective": "reconstruction"}

    def loss(self, sae: SAE, batch: Tensor, shared: dict) -> tuple[LossTerms, SAEOutput]:
        out = sae(token_rows(batch))
        return sae_loss(sae, out), out


def _paper_terms(sae: SAE, out: SAEOutput) -> tuple[Tensor, LossTerms]:
    """(phi * mean ||c||_1 + the rule's aux loss, saelib's terms): what every paper objective shares.
    saelib's NMSE is logged beside the paper's losses (detached), so all objectives share a scale."""
    terms = sae_loss(sae, out)
    raw_l1 = terms.l1 / sae.input_scale  # codes in the activations' units
    penalty = sae.cfg.l1_coeff / sae.cfg.d_in * raw_l1 + sae.cfg.aux_coeff * terms.aux
    return penalty, LossTerms(penalty, terms.nmse.detach(), terms.l1.detach(), terms.aux.detach())


def _mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean over elements; this rank's share of the global mean when data-parallel."""
    return F.mse_loss(a, b) / distributed.world_size()


class Local:
    """The paper's SAE_local: MSE(a, a_hat) + phi * ||c||_1."""

    def config(self) -> dict:
        return {"objective": "local"}

    def loss(self, sae: SAE, batch: Tensor, shared: dict) -> tuple[LossTerms, SAEOutput]:
        x = token_rows(batch)
        out = sae(x)
        penalty, terms = _paper_terms(sae, out)
        return dataclasses.replace(terms, total=_mse(out.x_hat, x) + penalty), out


class E2E:
    """The paper's SAE_e2e (``ds_coeff=0``) and SAE_e2e+ds (``ds_coeff`` = its beta > 0).

    ``model`` is a TransformerLens model, ``hook`` the residual stream the SAE splices into. The
    paper's settings: kl_coeff 1 for e2e; kl_coeff 0.5 and ds_coeff 2.5 (layers 2 and 6 of GPT-2),
    0.05 (layer 10) for e2e+ds. ``precision="bfloat16"`` runs the model under bfloat16 autocast
    (the SAE's own product follows its config's ``encoder_dtype``)."""

    def __init__(self, model, hook: str, kl_coeff: float = 1.0, ds_coeff: float = 0.0,
                 ds_hooks: Sequence[str] | None = None, precision: str = "float32"):
        self.start = parse_hook(hook).stream_index
        n_layers = model.cfg.n_layers
        if self.start is None:
            raise ValueError(f"e2e objectives splice into the residual stream and run the model on from "
                             f"there: use blocks.N.hook_resid_pre or blocks.N.hook_resid_post, not {hook!r}")
        if self.start >= n_layers:
            raise ValueError(f"{hook!r} is after the model's last block ({n_layers} blocks): no later "
                             "layers to run, so e2e equals local there; pick an earlier hook")
        self.kl_coeff, self.ds_coeff = kl_coeff, ds_coeff
        check(self, "kl_coeff", real(0), "must be a finite number >= 0")
        check(self, "ds_coeff", real(0), "must be a finite number >= 0")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
        self.later = later_residual_streams(model, hook)
        # The paper's D: every later block's input; at the last block, the final residual stream.
        ds_hooks = list((self.later[:-1] or self.later) if ds_hooks is None else ds_hooks)
        wrong = [h for h in ds_hooks if h not in self.later]
        if wrong or not ds_hooks:
            raise ValueError(f"downstream hooks {wrong or ds_hooks} are not residual streams after the "
                             f"SAE's {hook!r}; valid: {self.later}")
        for p in model.parameters():
            p.requires_grad_(False)  # frozen: the model never receives a gradient
        self.model, self.hook = model, hook
        self.ds_hooks = ds_hooks if ds_coeff > 0 else []
        self.precision = precision
        self.d_model = model.cfg.d_model

    def config(self) -> dict:
        return {"objective": "e2e_ds" if self.ds_coeff > 0 else "e2e", "hook": self.hook,
                "kl_coeff": self.kl_coeff, "ds_coeff": self.ds_coeff, "ds_hooks": self.ds_hooks,
                "precision": self.precision}

    def _autocast(self):
        if self.precision == "float32":
            return contextlib.nullcontext()
        device = torch.device(self.model.cfg.device).type
        return torch.autocast(device_type=device, dtype=PRECISIONS[self.precision])

    def run(self, windows: Tensor, hooks: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Log-probabilities [windows, ctx - 1, vocab] at positions 1.. and the activations at
        ``hooks`` (positions 1..), running the model from the SAE's layer on ``windows``."""
        acts: dict[str, Tensor] = {}

        def keep(act: Tensor, hook) -> None:
            acts[hook.name] = act[:, 1:].float()

        with self._autocast(), self.model.hooks(fwd_hooks=[(h, keep) for h in hooks]):
            logits = self.model(windows, start_at_layer=self.start)
        return logits[:, 1:].float().log_softmax(-1), acts

    def _clean(self, windows: Tensor, shared: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The clean run, once per step for every e2e SAE of the hook (it records every later
        residual stream, so e2e and e2e+ds SAEs share it)."""
        key = ("clean", self.hook, self.precision)
        if key not in shared:
            with torch.no_grad():
                shared[key] = self.run(windows, self.later)
        return shared[key]

    def loss(self, sae: SAE, batch: Tensor, shared: dict) -> tuple[LossTerms, SAEOutput]:
        if batch.ndim != 3:
            raise ValueError("e2e objectives train on windows of activations [windows, ctx, d_in] (run the "
                             "model on from the SAE's layer): wrap the cache in "
                             "saelib.subjects.activations.WindowTable; got token rows of shape "
                             f"{list(batch.shape)}")
        if batch.shape[-1] != self.d_model:
            raise ValueError(f"the activations have width {batch.shape[-1]} but the model's d_model is "
                             f"{self.d_model}: are the SAE, its activations and the model the same?")
        clean_logp, clean_acts = self._clean(batch, shared)
        out = sae(token_rows(batch))
        spliced = torch.cat([batch[:, :1], out.x_hat.reshape(batch.shape[0], -1, batch.shape[-1])], dim=1)
        logp, acts = self.run(spliced, self.ds_hooks)
        kl = F.kl_div(logp.flatten(0, 1), clean_logp.flatten(0, 1), log_target=True,
                      reduction="batchmean") / distributed.world_size()
        penalty, terms = _paper_terms(sae, out)
        total = self.kl_coeff * kl + penalty
        downstream = kl.new_zeros(())
        if self.ds_hooks:
            downstream = sum(_mse(acts[h], clean_acts[h]) for h in self.ds_hooks)
            downstream = downstream / len(self.ds_hooks)
            total = total + self.ds_coeff * downstream
        return dataclasses.replace(terms, total=total, kl=kl.detach(), downstream=downstream.detach()), out
