"""Chapter 2's exercises (adaptive sparse allocation): Zipf capacities, the aux_k loss and a Zipf
fit of feature densities."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from saelib.book.exercises.harness import Case, as_float, is_close, run_cases
from saelib.core.allocation import zipf_capacities, zipf_profile
from saelib.core.losses import aux_residual_loss
from saelib.core.metrics import zipf_fit
from saelib.core.sae import SAE, SAEConfig

__all__ = ["check_zipf_capacities", "check_aux_k", "check_zipf_fit"]


def check_zipf_capacities(fn: Callable[[int, int, int, float], Any]) -> bool:
    """Check ``fn(n_features, n_tokens, k, exponent) -> integer capacities per feature rank``:
    Zipf shares of the budget k * n_tokens, each at most n_tokens (the excess spread over the other
    ranks in proportion to their weight), rounded by largest remainder so they sum to the budget
    exactly. Compared with ``saelib.core.allocation.zipf_capacities``; where remainders tie, either
    rounding is accepted."""
    cases = [Case("64 features, 100 tokens, k = 4, s = 1", (64, 100, 4, 1.0)),
             Case("k = n_features = 8 (every feature takes every token)", (8, 10, 8, 1.0)),
             Case("a batch of one token, 32 features, k = 4", (32, 1, 4, 1.0)),
             Case("s = 0 (equal shares, every remainder tied)", (16, 50, 3, 0.0)),
             Case("s = 2 with k = 6 of 16 (several ranks capped at n_tokens)", (16, 20, 6, 2.0)),
             Case("1000 features, 37 tokens, k = 7, s = 1.1", (1000, 37, 7, 1.1))]

    def compare(case: Case, got: Any) -> list[str]:
        n_features, n_tokens, k, exponent = case.args
        got = torch.as_tensor(np.asarray(got))
        if got.shape != (n_features,):
            return [f"expected one capacity per feature ({n_features}), got shape {tuple(got.shape)}"]
        if got.is_floating_point() and not torch.equal(got, got.round()):
            return ["capacities must be whole numbers of tokens"]
        got = got.long()
        expected = zipf_capacities(n_features, n_tokens, k, exponent)
        target = zipf_profile(n_features, k, exponent) * n_tokens
        problems = []
        if int(got.sum()) != k * n_tokens:
            problems.append(f"capacities sum to {int(got.sum())}, expected the budget k x n_tokens = {k * n_tokens}")
        for r in torch.nonzero(got > n_tokens).flatten().tolist():
            problems.append(f"rank {r} gets {int(got[r])} tokens but the batch has only {n_tokens}: "
                            f"cap it and spread the excess over the other ranks")
        for r in torch.nonzero((got - target).abs() >= 1).flatten().tolist():
            if got[r] <= n_tokens:
                lo, hi = int(target[r].floor()), int(target[r].ceil())
                problems.append(f"rank {r} gets {int(got[r])}, its Zipf share is {float(target[r]):.3f} tokens "
                                f"(expected {lo}{'' if lo == hi else f' or {hi}'})")
        remainder = target - target.floor()
        rounded_up = expected > target.floor()
        tie = float(remainder[rounded_up].min()) if rounded_up.any() else float("inf")
        for r in torch.nonzero(got != expected).flatten().tolist():
            if abs(float(remainder[r]) - tie) > 1e-9 and (got[r] - target[r]).abs() < 1:
                problems.append(f"rank {r} gets {int(got[r])}, expected {int(expected[r])}: round up the ranks "
                                f"with the largest remainders (its share is {float(target[r]):.3f})")
        return problems

    return run_cases("Zipf capacities", fn, cases, compare)


def _dead_feature_sae(d_in: int, d_sae: int, k_aux: int, seed: int) -> SAE:
    return SAE(SAEConfig(d_in, d_sae, rule="topk", k=4, k_aux=k_aux, normalize_input=False, seed=seed))


def check_aux_k(fn: Callable[[Tensor, Tensor, Tensor, Tensor, int], Any]) -> bool:
    """Check ``fn(z, dead, decoder, residual, k_aux) -> loss``: each token takes the k_aux dead
    features with its largest positive pre-activations, decodes them (values z, no bias), and the
    loss is the NMSE of that decoding against the main reconstruction's residual x - x_hat; 0 when
    nothing is dead. Compared with ``saelib.core.losses.aux_residual_loss`` on a small TopK SAE."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for label, n_tokens, d_sae, k_aux, n_dead, negative_token in [
            ("32 tokens, 12 of 48 features dead, k_aux = 4", 32, 48, 4, 12, False),
            ("k_aux = 8 but only 3 dead features", 32, 48, 8, 3, False),
            ("no dead feature (the loss is 0)", 16, 24, 4, 0, False),
            ("token 0 with no positive pre-activation", 16, 24, 3, 10, True),
            ("a batch of two tokens", 2, 24, 2, 8, False)]:
        sae = _dead_feature_sae(8, d_sae, k_aux, seed=len(cases))
        x = torch.randn(n_tokens, 8, generator=gen)
        if negative_token:
            x[0] = 0.0
            with torch.no_grad():
                sae.b_enc.fill_(-0.05)  # token 0's pre-activations are all b_enc: negative
        dead = torch.zeros(d_sae, dtype=torch.bool)
        dead[torch.randperm(d_sae, generator=gen)[:n_dead]] = True
        out = sae(x)
        expected = float(aux_residual_loss(sae, out, dead.float()).detach())
        residual = (out.x_norm - out.x_hat_norm).detach()
        cases.append(Case(label, (out.preacts.clone(), dead, sae.decoder.detach().clone(), residual, k_aux),
                          expected))

    def compare(case: Case, got: Any) -> list[str]:
        value = as_float(got)
        return [] if is_close(value, case.expected) else [f"got {value:.6g}, expected {case.expected:.6g}"]

    return run_cases("aux_k loss", fn, cases, compare)


def check_zipf_fit(fn: Callable[[Any], Any]) -> bool:
    """Check ``fn(density) -> (exponent s, log10 C)``: the least-squares line through log10 density
    against log10 rank (ranks from 1) of the densities sorted from largest to smallest, features
    that never fired left out. Compared with ``saelib.core.metrics.zipf_fit``."""
    rng = np.random.default_rng(0)
    ranks = np.arange(1, 201)
    exact = 0.3 * ranks**-1.2
    cases = [Case("an exact power law 0.3 * rank^-1.2, sorted", (exact.copy(),)),
             Case("the same densities in random order", (rng.permutation(exact),)),
             Case("with 50 features that never fired (density 0)", (rng.permutation(np.r_[exact, np.zeros(50)]),)),
             Case("noisy densities of 500 features", (rng.permutation(0.05 * np.arange(1, 501) ** -0.8
                                                                     * rng.lognormal(0, 0.3, 500)),)),
             Case("only 3 features fired", (np.array([0.0, 0.02, 0.0, 0.1, 0.05]),))]

    def compare(case: Case, got: Any) -> list[str]:
        fit = zipf_fit(case.args[0])
        try:
            s, log_c = (float(v) for v in got)
        except (TypeError, ValueError):
            return [f"expected a pair (exponent s, log10 C), got {got!r}"]
        problems = []
        if not is_close(s, fit.exponent, rtol=1e-6, atol=1e-6):
            problems.append(f"exponent s = {s:.6g}, expected {fit.exponent:.6g}")
        if not is_close(log_c, fit.log10_scale, rtol=1e-6, atol=1e-6):
            problems.append(f"log10 C = {log_c:.6g}, expected {fit.log10_scale:.6g}")
        return problems

    return run_cases("Zipf fit", fn, cases, compare)
