"""Checks for the exercises at the end of each chapter, and the student copies of the notebooks.

Each ``check_*`` function runs a learner's function on random and edge-case inputs (ties, rows with
no positive entry, k equal to the number of features, a batch of one token, ...) and compares it
with saelib's own implementation. The convention, the same for every check:

* it returns ``True`` when every case agrees, so a notebook cell can ``assert check_x(my_x)``;
* otherwise it prints, in plain words, which case failed and how (which row or rank, expected
  against got) and returns ``False``; it never raises for a wrong answer, and a learner function
  that raises (the stub's ``NotImplementedError``) is reported the same way.

Solution cells carry the tag ``solution`` (plus ``hide-input``, which Jupyter Book renders as a
collapsed "show code" toggle); ``python -m saelib.book.exercises notebooks/ --out student/`` (or
``saelib student-copy``) writes copies of the notebooks without them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from saelib.core.allocation import AllocationContext, selection_mask, zipf_capacities, zipf_profile
from saelib.core.losses import aux_residual_loss, nmse
from saelib.core.metrics import zipf_fit
from saelib.core.sae import SAE, SAEConfig
from saelib.studies.splice import splice_metrics

SOLUTION_TAG = "solution"
MAX_REPORTED = 6
"""Problems printed per failing case: enough to see the pattern, few enough to read."""


@dataclass
class Case:
    """One input the learner's function is run on; ``label`` says in words what it probes."""

    label: str
    args: tuple
    expected: Any = None
    """Precomputed reference answer, where computing it needs more than the arguments."""


def _run(name: str, fn: Callable, cases: list[Case], compare: Callable[[Case, Any], list[str]]) -> bool:
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


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _close(got: float, expected: float, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return bool(np.isfinite(got)) and abs(got - expected) <= atol + rtol * abs(expected)


# --------------------------------------------------------------------------- allocation (chapter 0)

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

    return _run("TopK", fn, [Case(label, (z, k)) for label, z, k in _selection_cases()], compare)


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

    return _run("Mutual Choice", fn, [Case(label, (z, k)) for label, z, k in _selection_cases(1)], compare)


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
        value = _as_float(got)
        return [] if _close(value, expected) else [f"got {value:.6g}, expected {expected:.6g}"]

    return _run("NMSE", fn, cases, compare)


# --------------------------------------------------------------------------- splicing (chapter 1)

def tiny_model(seed: int = 0):
    """A randomly initialised 2-layer TransformerLens model: enough to check splicing code on, built
    in a fraction of a second and without any download."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=64,
                                  d_vocab=50, act_fn="gelu", normalization_type="LN", seed=seed)
    with warnings.catch_warnings():  # TransformerLens 3 deprecates the class it still ships
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg).eval()


def _splice_cases() -> tuple[Any, list[tuple[str, Tensor]]]:
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    windows = [("4 windows of 12 tokens", torch.randint(0, 50, (4, 12), generator=gen)),
               ("a batch of one window", torch.randint(0, 50, (1, 9), generator=gen)),
               ("11 windows of 6 tokens", torch.randint(0, 50, (11, 6), generator=gen))]
    return model, windows


def check_next_token_loss(fn: Callable[[Any, Tensor], Any]) -> bool:
    """Check ``fn(model, tokens) -> float``: the mean cross-entropy (nats/token) of predicting token
    t+1 from tokens up to t, over every predicted position of every window. Compared with the clean
    loss ``saelib.studies.splice.splice_metrics`` reports, on a small random model."""
    model, windows = _splice_cases()

    def compare(case: Case, got: Any) -> list[str]:
        expected = splice_metrics(model, "blocks.0.hook_resid_post", lambda x: x, case.args[1]).ce_clean
        value = _as_float(got)
        return [] if _close(value, expected) else [f"got {value:.5f} nats/token, expected {expected:.5f}"]

    return _run("next-token loss", fn, [Case(label, (model, w)) for label, w in windows], compare)


def check_ce_increase(fn: Callable[[Any, str, Callable, Tensor], Any]) -> bool:
    """Check ``fn(model, hook, reconstruct, tokens) -> float``: the next-token loss with the
    activation at ``hook`` replaced by ``reconstruct(activation)`` at every position but the first
    (BOS), minus the clean loss. Compared with ``splice_metrics(...).ce_increase``."""
    model, windows = _splice_cases()

    def noisy(x: Tensor) -> Tensor:
        return x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    reconstructs = [("the identity (increase 0)", lambda x: x), ("halving the activation", lambda x: 0.5 * x),
                    ("adding noise", noisy), ("zero-ablation", torch.zeros_like)]
    layer0, layer1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"
    cases = [Case(f"{what} at {layer0}, {windows[0][0]}", (model, layer0, r, windows[0][1])) for what, r in reconstructs]
    cases += [Case(f"halving the activation at {layer1}, {windows[0][0]}", (model, layer1, reconstructs[1][1], windows[0][1])),
              Case(f"adding noise at {layer0}, {windows[1][0]}", (model, layer0, noisy, windows[1][1])),
              Case(f"halving the activation at {layer1}, {windows[2][0]}", (model, layer1, reconstructs[1][1], windows[2][1]))]

    def compare(case: Case, got: Any) -> list[str]:
        model_, hook, reconstruct, tokens = case.args
        expected = splice_metrics(model_, hook, reconstruct, tokens).ce_increase
        value = _as_float(got)
        return [] if _close(value, expected, atol=1e-5) else [f"got {value:.5f} nats/token, expected {expected:.5f}"]

    return _run("CE-loss increase", fn, cases, compare)


# --------------------------------------------------------------------------- chapter 2

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

    return _run("Zipf capacities", fn, cases, compare)


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
        value = _as_float(got)
        return [] if _close(value, case.expected) else [f"got {value:.6g}, expected {case.expected:.6g}"]

    return _run("aux_k loss", fn, cases, compare)


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
        if not _close(s, fit.exponent, rtol=1e-6, atol=1e-6):
            problems.append(f"exponent s = {s:.6g}, expected {fit.exponent:.6g}")
        if not _close(log_c, fit.log10_scale, rtol=1e-6, atol=1e-6):
            problems.append(f"log10 C = {log_c:.6g}, expected {fit.log10_scale:.6g}")
        return problems

    return _run("Zipf fit", fn, cases, compare)


# --------------------------------------------------------------------------- training dynamics (chapter 4)

class CopyingModel(torch.nn.Module):
    """A hand-built induction "model": at each position it finds the previous occurrence of the
    current token and gives the token that followed it a logit of ``confidence`` (all other logits
    0; uniform where the token has not occurred). What a model that copies from context does, with
    no training: the ICL score's positive control."""

    def __init__(self, vocab: int, confidence: float = 10.0):
        super().__init__()
        self.vocab, self.confidence = vocab, confidence

    def forward(self, tokens: Tensor) -> Tensor:
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, seq in enumerate(tokens.tolist()):
            last_seen: dict[int, int] = {}
            for t, tok in enumerate(seq):
                if tok in last_seen:
                    logits[b, t, seq[last_seen[tok] + 1]] = self.confidence
                last_seen[tok] = t
        return logits


def check_icl_score(fn: Callable[[Any, Tensor], Any]) -> bool:
    """Check ``fn(model, sequences) -> float``: mean next-token loss on the first copy of each
    repeated random sequence minus that on the second copy, leaving out the first token of each
    copy. Compared with ``saelib.subjects.probes.icl_score`` on a random model and on a model that copies."""
    from saelib.subjects.probes import icl_score, repeated_sequences

    cases = [Case("a random 2-layer model, 6 sequences of 2 x 10 tokens",
                  (tiny_model(), repeated_sequences(6, 10, vocab=50, bos=0, seed=1))),
             Case("a model that copies, 4 sequences of 2 x 12 tokens",
                  (CopyingModel(1000), repeated_sequences(4, 12, vocab=1000, bos=0, seed=2))),
             Case("a model that copies, shortest sequences (2 x 2 tokens)",
                  (CopyingModel(1000), repeated_sequences(3, 2, vocab=1000, bos=0, seed=3))),
             Case("a batch of one sequence, random model",
                  (tiny_model(1), repeated_sequences(1, 15, vocab=50, bos=0, seed=4)))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = icl_score(*case.args)
        value = _as_float(got)
        if _close(value, expected.score):
            return []
        hint = (" (that is the second copy minus the first: the score is first - second)"
                if _close(-value, expected.score) else "")
        return [f"got {value:.5f}, expected {expected.score:.5f} = first copy {expected.first:.5f} - "
                f"second copy {expected.second:.5f}{hint}"]

    return _run("ICL score", fn, cases, compare)


def check_jaccard(fn: Callable[[Tensor, Tensor], Any]) -> bool:
    """Check ``fn(fired_a, fired_b) -> Tensor``: for each column (feature) i of the two boolean
    firing matrices [tokens, features], |A_i and B_i| / |A_i or B_i|, NaN where neither fires.
    Compared with ``saelib.studies.matching.jaccard``."""
    from saelib.studies.matching import jaccard

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(200, 12, generator=gen) < 0.1
    b = torch.rand(200, 12, generator=gen) < 0.1
    silent = a.clone()
    silent[:, [3, 7]] = False
    cases = [Case("random firing, 200 tokens x 12 features", (a, b)),
             Case("a feature against itself (Jaccard 1)", (a, a.clone())),
             Case("disjoint firing sets (Jaccard 0)", (a, ~a)),
             Case("features 3 and 7 never fire in either (NaN)", (silent, silent.clone())),
             Case("a single token", (a[:1], b[:1]))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = jaccard(*case.args)
        got = torch.as_tensor(np.asarray(got, dtype=np.float64)).float()
        if got.shape != expected.shape:
            return [f"expected one value per feature, shape {tuple(expected.shape)}, got {tuple(got.shape)}"]
        problems = []
        for i in range(len(expected)):
            e, g = float(expected[i]), float(got[i])
            if np.isnan(e) != np.isnan(g) or (not np.isnan(e) and not _close(g, e)):
                why = " (neither fires: nothing to compare, NaN)" if np.isnan(e) else ""
                problems.append(f"feature {i}: got {g:.4f}, expected {e:.4f}{why}")
        return problems

    return _run("Jaccard of firing sets", fn, cases, compare)


def check_max_cosine_match(fn: Callable[[Tensor, Tensor], Any]) -> bool:
    """Check ``fn(a, b) -> (index, cosine)``: for each row of ``a``, the row of ``b`` with the largest
    cosine similarity and that cosine. Compared with ``saelib.studies.matching.max_cosine_match`` (by the
    cosine reached, so either of two tied rows is accepted)."""
    from saelib.studies.matching import cosines, max_cosine_match

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20, 8, generator=gen)
    perm = torch.randperm(20, generator=gen)
    cases = [Case("random directions, 20 against 30", (a, torch.randn(30, 8, generator=gen))),
             Case("a permuted copy with rows scaled by 0.1 to 10 (cosines 1)",
                  (a, a[perm] * torch.logspace(-1, 1, 20)[:, None])),
             Case("b holds -a and a weaker copy: the largest cosine, not the largest |cosine|",
                  (a[:5], torch.cat([-a[:5], a[:5] + 0.5 * torch.randn(5, 8, generator=gen)]))),
             Case("one direction against many", (a[:1], torch.randn(50, 8, generator=gen)))]

    def compare(case: Case, got: Any) -> list[str]:
        x, y = case.args
        _, expected = max_cosine_match(x, y)
        try:
            index, cos = (torch.as_tensor(np.asarray(v)) for v in got)
        except (TypeError, ValueError):
            return [f"expected a pair (index, cosine), got {type(got).__name__}"]
        if index.shape != expected.shape or cos.shape != expected.shape:
            return [f"expected one index and one cosine per row of a ({len(x)}), got shapes "
                    f"{tuple(index.shape)} and {tuple(cos.shape)}"]
        reached = cosines(x, y)[torch.arange(len(x)), index.long().clamp(0, len(y) - 1)]
        problems = []
        for i in range(len(x)):
            if not _close(float(cos[i]), float(expected[i]), rtol=1e-4, atol=1e-5):
                problems.append(f"row {i}: cosine {float(cos[i]):.4f}, expected {float(expected[i]):.4f}")
            elif not _close(float(reached[i]), float(expected[i]), rtol=1e-4, atol=1e-5):
                problems.append(f"row {i}: index {int(index[i])} has cosine {float(reached[i]):.4f} with it, "
                                f"the best row has {float(expected[i]):.4f}")
        return problems

    return _run("max-cosine matching", fn, cases, compare)


# --------------------------------------------------------------------------- end to end (chapter 3)

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
        value = _as_float(got)
        if _close(value, expected, rtol=1e-4, atol=1e-6):
            return []
        swapped = reference(*reversed(case.args))
        summed = expected * case.args[0].shape[:-1].numel()
        hint = (" (that is KL(spliced || clean): the clean distribution is the reference)"
                if _close(value, swapped, rtol=1e-4) else
                " (that is the sum over positions: average it)" if _close(value, summed, rtol=1e-4) else "")
        return [f"got {value:.6f}, expected {expected:.6f}{hint}"]

    return _run("e2e KL loss", fn, cases, compare)


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
            if not _close(float(got[i]), float(expected[i]), rtol=1e-4, atol=1e-5):
                why = " (a row is always cosine 1 with itself: leave it out)" if _close(float(got[i]), 1.0) else ""
                problems.append(f"row {i}: got {float(got[i]):.4f}, expected {float(expected[i]):.4f}{why}")
        return problems

    return _run("max cosine within a dictionary", fn, cases, compare)


# --------------------------------------------------------------------------- vision (chapter 5)

def check_label_entropy(fn: Callable[[Tensor], Any]) -> bool:
    """Check ``fn(class_mass) -> Tensor``: for each row (latent) of a non-negative [latents,
    classes] matrix, the entropy in nats of the row divided by its sum (0 log 0 = 0), NaN for a
    row of zeros. Compared with ``saelib.studies.patch_analysis.label_entropy``."""
    from saelib.studies.patch_analysis import label_entropy

    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(12, 10, generator=gen) * 5
    sparse = mass * (torch.rand(12, 10, generator=gen) < 0.3)
    sparse[4] = 0
    one_hot = torch.zeros(3, 10)
    one_hot[torch.arange(3), torch.tensor([0, 5, 9])] = 2.5
    cases = [Case("random masses, 12 latents x 10 classes", (mass,)),
             Case("mostly zero classes (0 log 0 = 0), latent 4 silent (NaN)", (sparse,)),
             Case("single-class latents (entropy 0)", (one_hot,)),
             Case("uniform over 10 classes (ln 10)", (torch.ones(2, 10) * 0.3,)),
             Case("masses of 1e-8 (scale does not matter)", (mass[:3] * 1e-8,))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = label_entropy(*case.args)
        got = torch.as_tensor(np.asarray(got, dtype=np.float64)).float()
        if got.shape != expected.shape:
            return [f"expected one value per latent, shape {tuple(expected.shape)}, got {tuple(got.shape)}"]
        problems = []
        for i in range(len(expected)):
            e, g = float(expected[i]), float(got[i])
            if np.isnan(e) != np.isnan(g) or (not np.isnan(e) and not _close(g, e, atol=1e-5)):
                why = " (the latent never fired: NaN)" if np.isnan(e) else ""
                problems.append(f"latent {i}: got {g:.4f}, expected {e:.4f}{why}")
        return problems

    return _run("label entropy", fn, cases, compare)


def check_masked_reconstruction(fn: Callable[[SAE, Tensor, Tensor], Any]) -> bool:
    """Check ``fn(sae, x, keep) -> x_hat``: the SAE's reconstruction of ``x`` [tokens, d_in] from
    the latents where the boolean mask ``keep`` [d_sae] is True, in the input's units. Compared
    with ``saelib.studies.patch_analysis.masked_reconstruction`` on a ReLU SAE whose input scale is not 1
    and whose b_dec is not 0."""
    from saelib.studies.patch_analysis import masked_reconstruction

    gen = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, rule="relu", l1_coeff=0.1))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(32, generator=gen) * 0.3)
        x = torch.randn(40, 8, generator=gen) * 3 + 1
        sae.init_from_sample(x)
    half = torch.rand(32, generator=gen) < 0.5
    cases = [Case("half the latents kept, 40 tokens", (sae, x, half)),
             Case("every latent kept (the plain reconstruction)", (sae, x, torch.ones(32, dtype=torch.bool))),
             Case("no latent kept (b_dec alone, in input units)", (sae, x, torch.zeros(32, dtype=torch.bool))),
             Case("one latent kept, one token", (sae, x[:1], torch.arange(32) == 3))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = masked_reconstruction(*case.args)
        got = torch.as_tensor(np.asarray(got.detach() if isinstance(got, Tensor) else got,
                                         dtype=np.float32))
        if got.shape != expected.shape:
            return [f"expected a reconstruction of shape {tuple(expected.shape)}, got {tuple(got.shape)}"]
        bad = (got - expected).abs().amax(1) > 1e-4 * (1 + expected.abs().amax(1))
        hint = " (decoded in normalised units: divide by sae.input_scale)" if torch.allclose(
            got, expected * sae.input_scale, atol=1e-4) else ""
        return [f"token {int(t)}: got {[round(v, 4) for v in got[t, :3].tolist()]}..., expected "
                f"{[round(v, 4) for v in expected[t, :3].tolist()]}...{hint}" for t in torch.nonzero(bad).flatten()]

    return _run("masked reconstruction", fn, cases, compare)

# --------------------------------------------------------------------------- scale (chapter 2b)

def check_gap_trend(fn: Callable[[Any, float], Any]) -> bool:
    """Check ``fn(ratios, tolerance) -> str``: "closes", "stays" or "widens" for ratios to a baseline
    at increasing training lengths. Compared with ``saelib.studies.scaling.gap_trend``."""
    from saelib.studies.scaling import gap_trend

    cases = [Case("a gap of 12% shrinking to 3%", ([1.12, 1.08, 1.03], 0.02)),
             Case("a gap of 3% growing to 9%", ([1.03, 1.05, 1.09], 0.02)),
             Case("12% to 11%: within the tolerance", ([1.12, 1.10, 1.11], 0.02)),
             Case("worse than the baseline, then better (crosses 1)", ([1.08, 1.0, 0.95], 0.02)),
             Case("better than the baseline by 5%, then by 10% (a gap in its favour widens)",
                  ([0.95, 0.92, 0.90], 0.02)),
             Case("only the first and the last value count", ([1.10, 1.50, 1.10], 0.02)),
             Case("a wider tolerance turns 'closes' into 'stays'", ([1.12, 1.08], 0.05)),
             Case("two values, equal", ([1.0, 1.0], 0.02))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = gap_trend(*case.args)
        return [] if got == expected else [f"ratios {case.args[0]}: got {got!r}, expected {expected!r}"]

    return _run("gap_trend", fn, cases, compare)


def check_first_tokens_at(fn: Callable[[Any, str, str, float], Any]) -> bool:
    """Check ``fn(history, sae, column, level) -> int | None``: training tokens at the first logged
    step where ``column`` of that SAE reached ``level``. Compared with
    ``saelib.studies.scaling.first_tokens_at``."""
    import pandas as pd

    from saelib.studies.scaling import first_tokens_at

    history = pd.DataFrame({
        "sae": ["topk", "mc"] * 5,
        "tokens": [t for t in (1000, 2000, 3000, 4000, 5000) for _ in range(2)],
        "dead_frac": [0.0, 0.0, 0.004, 0.02, 0.01, 0.0, 0.03, 0.0, 0.008, 0.0],
        "nmse": [0.9, 0.95, 0.5, 0.6, 0.3, 0.4, 0.25, 0.35, 0.2, 0.3]})
    cases = [Case("TopK first reaches 1% dead exactly at the level (>=)", (history, "topk", "dead_frac", 0.01)),
             Case("MC reaches 1% between two other SAEs' rows", (history, "mc", "dead_frac", 0.01)),
             Case("a level never reached (None)", (history, "topk", "dead_frac", 0.5)),
             Case("reached, then falling below again: the first time counts", (history, "topk", "dead_frac", 0.005)),
             Case("reached at the first logged step", (history, "mc", "nmse", 0.9))]

    def compare(case: Case, got: Any) -> list[str]:
        expected = first_tokens_at(*case.args)
        return [] if got == expected and (got is None) == (expected is None) else [
            f"SAE {case.args[1]!r}, {case.args[2]} >= {case.args[3]}: got {got!r}, expected {expected!r}"]

    return _run("first_tokens_at", fn, cases, compare)


# --------------------------------------------------------------------------- student copies

def strip_solutions(nb) -> int:
    """Remove the cells tagged ``solution`` from a notebook in place; return how many."""
    keep = [c for c in nb.cells if SOLUTION_TAG not in c.get("metadata", {}).get("tags", [])]
    removed = len(nb.cells) - len(keep)
    nb.cells = keep
    return removed


def student_copy(source: Path, out: Path) -> dict[Path, int]:
    """Write every notebook under ``source`` (a folder, or one .ipynb) to ``out`` without its
    solution cells; return {written path: solution cells removed}. Everything else is untouched."""
    import nbformat

    source, out = Path(source), Path(out)
    paths = [source] if source.is_file() else sorted(source.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no .ipynb notebooks in {source}")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        removed = strip_solutions(nb)
        target = out / path.name
        if target.resolve() == path.resolve():
            raise ValueError(f"refusing to overwrite {path} with its student copy: choose another --out")
        nbformat.write(nb, target)
        written[target] = removed
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="saelib student-copy",
        description="Write copies of the book's notebooks with the exercise solutions removed (every "
                    f"cell tagged {SOLUTION_TAG!r}); the exercise stubs and their check cells stay.")
    ap.add_argument("source", type=Path, nargs="?", default=Path("notebooks"),
                    help="a folder of notebooks or one .ipynb (default: notebooks)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the student copies")
    a = ap.parse_args(argv)
    try:
        written = student_copy(a.source, a.out)
    except (OSError, ValueError) as e:  # a missing source, an --out that cannot be written, a bad notebook
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, removed in written.items():
        print(f"{path}: {removed} solution cell(s) removed")
    return 0
