"""Chapter 1's exercises (the subject models): the next-token loss and the CE-loss increase of a
splice, checked on a small random model of their own (``tiny_model``)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from saelib.book.exercises.harness import Case, as_float, is_close, run_cases
from saelib.studies.splice import splice_metrics

__all__ = ["tiny_model", "check_next_token_loss", "check_ce_increase"]


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
        value = as_float(got)
        return [] if is_close(value, expected) else [f"got {value:.5f} nats/token, expected {expected:.5f}"]

    return run_cases("next-token loss", fn, [Case(label, (model, w)) for label, w in windows], compare)


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
    halve = reconstructs[1][1]
    cases = [Case(f"{what} at {layer0}, {windows[0][0]}", (model, layer0, r, windows[0][1]))
             for what, r in reconstructs]
    cases += [Case(f"halving the activation at {layer1}, {windows[0][0]}", (model, layer1, halve, windows[0][1])),
              Case(f"adding noise at {layer0}, {windows[1][0]}", (model, layer0, noisy, windows[1][1])),
              Case(f"halving the activation at {layer1}, {windows[2][0]}", (model, layer1, halve, windows[2][1]))]

    def compare(case: Case, got: Any) -> list[str]:
        model_, hook, reconstruct, tokens = case.args
        expected = splice_metrics(model_, hook, reconstruct, tokens).ce_increase
        value = as_float(got)
        return [] if is_close(value, expected, atol=1e-5) else [f"got {value:.5f} nats/token, expected {expected:.5f}"]

    return run_cases("CE-loss increase", fn, cases, compare)
