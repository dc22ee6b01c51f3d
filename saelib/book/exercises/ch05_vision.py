"""Chapter 5's exercises (patch-level SAEs on a ViT): the label entropy of a latent and the
reconstruction from a subset of latents."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from saelib.book.exercises.harness import Case, is_close, run_cases
from saelib.core.sae import SAE, SAEConfig

__all__ = ["check_label_entropy", "check_masked_reconstruction"]


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
            if np.isnan(e) != np.isnan(g) or (not np.isnan(e) and not is_close(g, e, atol=1e-5)):
                why = " (the latent never fired: NaN)" if np.isnan(e) else ""
                problems.append(f"latent {i}: got {g:.4f}, expected {e:.4f}{why}")
        return problems

    return run_cases("label entropy", fn, cases, compare)


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

    return run_cases("masked reconstruction", fn, cases, compare)
