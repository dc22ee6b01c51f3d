"""Chapter 4's exercises (SAE features across training): the ICL score (with ``CopyingModel``, its
positive control), the Jaccard of firing sets and max-cosine matching of two dictionaries."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from saelib.book.exercises.ch01_subject_models import tiny_model
from saelib.book.exercises.harness import Case, as_float, is_close, run_cases

__all__ = ["CopyingModel", "check_icl_score", "check_jaccard", "check_max_cosine_match"]


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
    from saelib.subjects.probes import RepeatProbe, icl_score, repeated_sequences

    cases = [Case("a random 2-layer model, 6 sequences of 2 x 10 tokens",
                  (tiny_model(), repeated_sequences(6, 10, vocab=50, bos=0, seed=1))),
             Case("a model that copies, 4 sequences of 2 x 12 tokens",
                  (CopyingModel(1000), repeated_sequences(4, 12, vocab=1000, bos=0, seed=2))),
             Case("a model that copies, shortest sequences (2 x 2 tokens)",
                  (CopyingModel(1000), repeated_sequences(3, 2, vocab=1000, bos=0, seed=3))),
             Case("a batch of one sequence, random model",
                  (tiny_model(1), repeated_sequences(1, 15, vocab=50, bos=0, seed=4)))]

    def compare(case: Case, got: Any) -> list[str]:
        model, sequences = case.args
        expected = icl_score(model, RepeatProbe.halves(sequences))
        value = as_float(got)
        if is_close(value, expected.score):
            return []
        hint = (" (that is the second copy minus the first: the score is first - second)"
                if is_close(-value, expected.score) else "")
        return [f"got {value:.5f}, expected {expected.score:.5f} = first copy {expected.first:.5f} - "
                f"second copy {expected.second:.5f}{hint}"]

    return run_cases("ICL score", fn, cases, compare)


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
            if np.isnan(e) != np.isnan(g) or (not np.isnan(e) and not is_close(g, e)):
                why = " (neither fires: nothing to compare, NaN)" if np.isnan(e) else ""
                problems.append(f"feature {i}: got {g:.4f}, expected {e:.4f}{why}")
        return problems

    return run_cases("Jaccard of firing sets", fn, cases, compare)


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
            if not is_close(float(cos[i]), float(expected[i]), rtol=1e-4, atol=1e-5):
                problems.append(f"row {i}: cosine {float(cos[i]):.4f}, expected {float(expected[i]):.4f}")
            elif not is_close(float(reached[i]), float(expected[i]), rtol=1e-4, atol=1e-5):
                problems.append(f"row {i}: index {int(index[i])} has cosine {float(reached[i]):.4f} with it, "
                                f"the best row has {float(expected[i]):.4f}")
        return problems

    return run_cases("max-cosine matching", fn, cases, compare)
