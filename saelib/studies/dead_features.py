"""Why an SAE's dead features are dead: two mechanisms, measured on a batch allocated as in training.

Chapter 2b finds Mutual Choice (MC) losing more features than TopK in a large dictionary. Two
mechanisms would give that table, and each leaves its own trace:

* **Batch competition.** MC ranks every (token, feature) pre-activation of a batch against all
  the others. A feature that is among the k largest of some token, which TopK would keep, can
  still lose its slots to features that are larger on other tokens. The trace: dead features of
  an MC SAE that a per-token top-k of the same pre-activations would keep (``topk_would_keep``).
  Under TopK that share is zero at the step the features died, by construction.
* **Auxiliary slots taken by the living.** ``aux_zipf`` gives its k_aux slots per token to the
  features with the largest shortfall-weighted pre-activations, dead or under-used alike, where
  ``aux_k`` gives them to dead features only. The trace: the share of the auxiliary slots that go
  to dead features (``aux_slots_to_dead``; 1 for aux_k whenever a dead feature is positive).

``positive_anywhere`` says how many dead features could fire at all on the batch (a positive
pre-activation on some token): a feature whose pre-activations are all negative is out of reach
of both mechanisms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelib.core.allocation import AllocationContext
from saelib.core.devices import to_device_of
from saelib.core.losses import aux_slots, aux_weights, dead_weights
from saelib.core.sae import SAE


@torch.no_grad()
def dead_feature_traces(sae: SAE, x: Tensor) -> dict[str, float]:
    """The two mechanisms' traces for ``sae`` on the batch ``x`` [tokens, d_in] (see the module
    docstring), read without changing the SAE: ``dead`` (features dead by the trainer's count),
    ``positive_anywhere``, ``topk_would_keep`` and ``kept_by_rule`` (shares of the dead features:
    positive on some token, among some token's k largest positive pre-activations, kept by the
    SAE's own rule on this batch), and ``aux_slots_to_dead`` (share of the auxiliary slots that go
    to dead features under the SAE's aux loss; NaN without one or when no slot is filled)."""
    x = to_device_of(x, sae)
    z, _ = sae.preactivations(x * sae.input_scale)
    z = z.float().contiguous()
    dead = dead_weights(sae).bool()
    n_dead = int(dead.sum())
    traces = {"dead": float(n_dead), "positive_anywhere": float("nan"), "topk_would_keep": float("nan"),
              "kept_by_rule": float("nan"), "aux_slots_to_dead": _aux_slots_to_dead(sae, z, dead)}
    if n_dead == 0:
        return traces
    top = z.topk(sae.cfg.k, dim=1)
    per_token = torch.zeros_like(dead)
    per_token[top.indices[top.values > 0]] = True
    ctx = AllocationContext(k=sae.cfg.k, zipf_exponent=sae.cfg.zipf_exponent,
                            feature_rank=sae.feature_rank() if sae.rule.feature_major else None)
    by_rule = torch.zeros_like(dead)
    by_rule[sae.rule.select(z, ctx) % sae.cfg.d_sae] = True
    traces.update(positive_anywhere=float((z[:, dead] > 0).any(0).float().mean()),
                  topk_would_keep=float(per_token[dead].float().mean()),
                  kept_by_rule=float(by_rule[dead].float().mean()))
    return traces


def _aux_slots_to_dead(sae: SAE, z: Tensor, dead: Tensor) -> float:
    """Share of the filled auxiliary slots (``saelib.core.losses.aux_slots``, as the aux loss picks
    them) held by dead features."""
    weights = aux_weights(sae)
    if weights is None:
        return float("nan")
    _, cols = aux_slots(z, weights, sae.cfg.k_aux)
    return float(dead[cols].float().mean()) if cols.numel() else float("nan")
