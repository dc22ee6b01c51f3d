"""Synthetic activations with a known sparse structure, to check that SAEs recover it.

Each token is a sparse non-negative combination of ground-truth unit directions plus small noise:

    x = sum_i c_i f_i + noise,   c_i = Bernoulli(p_i) * Exp(1) magnitude,

with feature probabilities p_i following a Zipf profile (a few common features, a long tail of rare
ones), the shape real SAE feature densities have, scaled so that on average ``active`` features
are on per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelib.core import seeding
from saelib.core.allocation import zipf_profile


@dataclass
class SyntheticData:
    activations: Tensor
    """[n_tokens, d] float32."""
    true_directions: Tensor
    """[n_features, d], unit norm."""
    true_codes_l0: float
    """Mean number of ground-truth features active per token."""
    true_l0_per_token: Tensor
    """[n_tokens] number of ground-truth features active in each token."""
    feature_prob: Tensor
    """Firing probability of each true feature."""


def make_synthetic(n_tokens: int, d: int, n_features: int, active: float, zipf_exponent: float = 0.5,
                   noise: float = 0.01, seed: int = 0) -> SyntheticData:
    gen = seeding.generator("synthetic_data", seed)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    prob = zipf_profile(n_features, active, zipf_exponent).float()
    fires = torch.rand(n_tokens, n_features, generator=gen) < prob
    magnitude = -torch.log(torch.rand(n_tokens, n_features, generator=gen).clamp(min=1e-12))
    codes = fires * magnitude
    x = codes @ directions + noise * torch.randn(n_tokens, d, generator=gen)
    l0 = fires.sum(1)
    return SyntheticData(x, directions, float(l0.float().mean()), l0, prob)
