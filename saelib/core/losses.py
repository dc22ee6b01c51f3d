"""Training losses. All are computed in the SAE's normalised units (see SAEConfig.normalize_input).

aux_zipf, the formula used here (the paper does not state one, see the book's chapter 2):

    u_i     = clamp(1 - p_i / t_{r(i)}, 0, 1)       shortfall of feature i from its Zipf target
    s_{t,i} = u_i * z_{t,i}                          aux score of feature i on token t (u_i > 0)
    S_t     = the k_aux features with the largest positive s_{t,i}
    e_hat_t = sum_{i in S_t} z_{t,i} W_dec[i]        decoded with the features' own pre-activations
    L       = NMSE(e_hat, e),   e = x - x_hat (detached)

p_i is feature i's running firing density, r(i) its rank by density and t_r the Zipf profile
(saelib.core.allocation.zipf_profile) with the same total k. A dead feature has p_i = 0, so u_i = 1: when
the only features below target are dead ones, aux_zipf IS aux_k. Under-utilised features join the
auxiliary reconstruction in proportion to how far below target they are, so they are pushed to
explain residual error (and so to fire more) without disturbing features at or above target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelib.core import distributed
from saelib.core.allocation import row_topk, zipf_profile
from saelib.core.sae import SAE, SAEOutput, decode_sparse


@torch.no_grad()
def centered_sq_sum(x: Tensor) -> Tensor:
    """sum_t ||x_t - mean(x)||^2 over the (global) batch, accumulated in float64."""
    x64 = x.double()
    flat = x64.reshape(-1)  # a dot: no squared copy (3x faster than (x64 * x64).sum() on a CPU)
    stats = torch.cat([x64.new_tensor([len(x)]), torch.dot(flat, flat)[None], x64.sum(0)])
    n, sq, total = distributed.all_reduce(stats).split([1, 1, x.shape[1]])
    return (sq - (total * total).sum() / n).clamp(min=1e-12).squeeze().to(x.dtype)


def nmse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Normalised MSE = fraction of variance unexplained: error relative to predicting the mean.

    Data-parallel: this rank's share, its squared error over the global batch's variance, so the
    shares (and their gradients) sum over ranks to the global-batch NMSE."""
    diff = (x_hat - x).flatten()
    return diff.dot(diff) / centered_sq_sum(x)  # dot: one fused pass (pow/square are slow here)


def l1(out: SAEOutput) -> Tensor:
    """Mean over (global) tokens of the codes' L1 norm (this rank's share when data-parallel)."""
    return out.codes.values.abs().sum() / (out.codes.shape[0] * distributed.world_size())


def dead_weights(sae: SAE) -> Tensor:
    """1 for features that have not fired for cfg.dead_after_tokens training tokens, else 0."""
    return (sae.tokens_since_fired >= sae.cfg.dead_after_tokens).float()


def zipf_shortfall_weights(sae: SAE) -> Tensor:
    """u_i = clamp(1 - density_i / target_{rank(i)}, 0, 1): 1 for dead features, 0 at/above target."""
    density = sae.density
    order = torch.argsort(-density, stable=True)
    target = torch.empty_like(density)
    target[order] = zipf_profile(len(density), sae.cfg.k, sae.cfg.zipf_exponent).to(density)
    shortfall = (1 - density / target).clamp(0, 1)
    # Until a feature has had time to fire it is neither dead nor under-used.
    warming_up = sae.tokens_since_fired < sae.cfg.dead_after_tokens
    return torch.where((density == 0) & warming_up, torch.zeros_like(shortfall), shortfall)


def aux_weights(sae: SAE) -> Tensor | None:
    """Each feature's weight in the SAE's auxiliary loss (``cfg.aux``): dead features for aux_k,
    Zipf shortfalls for aux_zipf; None without an auxiliary loss."""
    if sae.cfg.aux == "aux_k":
        return dead_weights(sae)
    if sae.cfg.aux == "aux_zipf":
        return zipf_shortfall_weights(sae)
    return None


def aux_slots(z: Tensor, weights: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the auxiliary reconstruction's entries: for each token the k_aux features of
    positive weight with the largest weighted pre-activations, kept where the pre-activation is
    positive (rows ascending)."""
    eligible = torch.nonzero(weights > 0).squeeze(1)
    if eligible.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=z.device)
        return empty, empty
    scores = z[:, eligible] * weights[eligible]
    k_aux = min(k_aux, eligible.numel())
    top = row_topk(scores, k_aux)
    rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k_aux)
    cols = eligible[top.flatten()]
    positive = z[rows, cols] > 0
    return rows[positive], cols[positive]


def aux_residual_loss(sae: SAE, out: SAEOutput, weights: Tensor) -> Tensor:
    """NMSE of the main reconstruction's residual, rebuilt from the k_aux top weighted features."""
    z = out.preacts
    rows, cols = aux_slots(z, weights, sae.cfg.k_aux)
    if rows.numel() == 0:
        return out.x_norm.new_zeros(())
    values = sae.kept_values(out.x_norm, z, out.preact_bias, rows, cols)
    residual = (out.x_norm - out.x_hat_norm).detach()
    return nmse(residual, decode_sparse(rows, cols, values, sae.decoder, z.shape[0]))


@dataclass
class LossTerms:
    total: Tensor
    """What the optimiser minimises."""
    nmse: Tensor
    l1: Tensor
    """Mean over tokens of the codes' L1 norm."""
    aux: Tensor
    kl: Tensor | None = None
    """KL(clean || spliced) of the next-token distributions (e2e objectives, saelib.core.objectives)."""
    downstream: Tensor | None = None
    """Mean MSE at the later residual streams (e2e+ds)."""


def sae_loss(sae: SAE, out: SAEOutput) -> LossTerms:
    """NMSE + l1_coeff * L1 + aux_coeff * auxiliary loss, as configured in sae.cfg."""
    cfg = sae.cfg
    recon = nmse(out.x_norm, out.x_hat_norm)
    sparsity = l1(out)
    weights = aux_weights(sae)
    aux = recon.new_zeros(()) if weights is None else aux_residual_loss(sae, out, weights)
    total = recon + cfg.l1_coeff * sparsity + cfg.aux_coeff * aux
    return LossTerms(total, recon, sparsity, aux)
