"""Allocation rules: which (token, feature) entries of the pre-activation matrix an SAE keeps.

An SAE variant is mostly its allocation rule (Ayonrinde 2024). Every rule here is one function

    select(z, ctx) -> kept

from pre-activations ``z`` (tokens x features) to the row-major flat indices of the kept entries,
grouped by row in ascending row order (the layout the sparse decoder needs). Kept values are
``z.flatten()[kept]``; a rule never keeps a non-positive entry.

Adding a rule: write the function and decorate it with ``@register("name", ...)``. Everything else
that names rules (the SAE's inference mode, SAELens export, the book's plot colours) reads the
registry, so nothing else needs editing.

Feature Choice comes in three capacity profiles, each its own rule: ``feature_choice`` (Zipf shares
with a floor of one token per feature, the book's default), ``feature_choice_uniform`` (one m for
every feature) and ``feature_choice_unfloored`` (the pure Zipf share, whose tail ranks get no token
in a small batch).

Batch-level rules (mutual and feature choice) allocate over the GLOBAL batch when training is
data-parallel: each rank sends its candidate values to the others, all ranks agree on the same
thresholds, and each keeps its own entries above them, so N ranks with B/N tokens each select what
one process with B tokens would (Mutual Choice breaks ties at its threshold by global position, as
one process does, so it keeps exactly k * B entries even with bfloat16 ties).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from saelib.core import distributed


@dataclass
class AllocationContext:
    """What a rule may read besides z."""

    k: int
    """Budget: active features per token (exact for topk, on average over the batch for FC and MC)."""
    feature_rank: Tensor | None = None
    """Rank of each feature (0 = first). Feature Choice gives the Zipf capacity of rank r to the
    feature holding that rank; the SAE ranks features by running demand (see SAE.demand)."""
    zipf_exponent: float = 1.0
    """Exponent s of the Zipf capacity profile m_r proportional to (r + 1) ** -s."""


@dataclass(frozen=True)
class Rule:
    select: Callable[[Tensor, AllocationContext], Tensor]
    inference_threshold: Literal["none", "global", "per_feature"]
    """How the rule encodes at inference. Batch-level rules cannot encode one token on its own, so
    the SAE tracks the smallest value the rule kept during training (as BatchTopK does) and keeps
    entries above that threshold at inference: one global value (MC) or one per feature (FC)."""
    l1_penalty: bool
    """True for rules whose sparsity comes from an L1 penalty rather than a budget (relu)."""
    feature_major: bool
    """The rule reads z column by column, so the SAE computes z in feature-major memory layout."""
    label: str
    """How the book names the rule in figures and tables."""
    color: str
    """The rule's colour in every figure of the book."""
    revision: int = 0
    """Raised when a rule's selection changes under an unchanged name, so that SAEs cached under the
    old selection are not reused (``saelib.core.training.train_cached`` keys on it when non-zero)."""

    @property
    def saelens_architecture(self) -> str:
        """SAELens's name for an SAE that encodes as this rule does at inference: an L1 rule is a
        "standard" SAE, a per-token budget "topk", a tracked threshold "jumprelu"."""
        if self.l1_penalty:
            return "standard"
        return "topk" if self.inference_threshold == "none" else "jumprelu"


RULES: dict[str, Rule] = {}


def register(name: str, *, label: str, color: str, inference_threshold: str = "none", l1_penalty: bool = False,
             feature_major: bool = False, revision: int = 0):
    """Decorator: add ``fn`` to the registry as rule ``name`` (a name may be registered once)."""
    if inference_threshold not in ("none", "global", "per_feature"):
        raise ValueError(f"inference_threshold must be 'none', 'global' or 'per_feature', got {inference_threshold!r}")

    def add(fn: Callable[[Tensor, AllocationContext], Tensor]):
        if name in RULES:
            raise ValueError(f"allocation rule {name!r} is already registered (by {RULES[name].select.__qualname__}); "
                             "pick another name")
        RULES[name] = Rule(fn, inference_threshold, l1_penalty, feature_major, label, color,  # type: ignore[arg-type]
                           revision)
        return fn

    return add


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown allocation rule {name!r}; valid rules: {sorted(RULES)}")
    return RULES[name]


def _positive(z_flat: Tensor, flat_idx: Tensor) -> Tensor:
    return flat_idx[z_flat[flat_idx] > 0]


@register("relu", label="ReLU/L1", color="#7f7f7f", l1_penalty=True)
def relu(z: Tensor, ctx: AllocationContext) -> Tensor:
    """Keep every positive entry (a standard SAE; sparsity comes from the L1 penalty)."""
    return torch.nonzero(z.flatten() > 0).squeeze(1)


def row_topk(z: Tensor, k: int) -> Tensor:
    """Column indices [rows, k] of the k largest entries of each row of ``z``, unordered: the values
    ``torch.topk`` selects (where the k-th value ties, other columns of that value may be picked).

    On a CPU, ``torch.topk`` over a wide row costs about a sixth of an SAE step (4608 features). A
    blocked selection is up to 2x faster: split each row into n / c strided blocks of c entries,
    keep the k blocks with the largest maxima, and select among their k * c entries. It is exact:
    a block holding one of the row's k largest entries has a maximum at least the k-th largest
    value, and at most k blocks have one (each such maximum is itself among the k largest)."""
    n_rows, n = z.shape
    # Block size: the fastest of 4-64 measured on 2 cores (4608 or 36,864 features, k 16-128).
    c = 2 ** max(0, int(math.log2(math.sqrt(n / max(k, 1)) / 1.5)))
    if z.device.type != "cpu" or not z.is_contiguous() or c < 2 or n % c or n // c < k:
        return z.topk(k, dim=1, sorted=False).indices
    n_blocks = n // c
    block_max = z.view(n_rows, c, n_blocks).amax(1)  # block j holds columns j, j + n_blocks, ...
    blocks = block_max.topk(k, dim=1, sorted=False).indices
    cols = (blocks[:, :, None] + n_blocks * torch.arange(c, device=z.device)).view(n_rows, k * c)
    return cols.gather(1, z.gather(1, cols).topk(k, dim=1, sorted=False).indices)


@register("topk", label="TopK", color="#1f77b4", revision=1)
def topk(z: Tensor, ctx: AllocationContext) -> Tensor:
    """Each token keeps its k largest pre-activations (Gao et al. 2024)."""
    n_tokens, n_features = z.shape
    idx = row_topk(z, ctx.k)
    flat = (idx + torch.arange(n_tokens, device=z.device)[:, None] * n_features).flatten()
    return _positive(z.flatten(), flat)


def top_n_indices(values: Tensor, n: int) -> Tensor:
    """Indices of exactly n largest entries of a 1-D tensor (unordered). Ties at the n-th value are
    broken by position, which matters for bfloat16 pre-activations, where equal values are common.

    A full top-n or selection over millions of entries is slow on a CPU, so a strided sample first
    bounds the threshold from below; the exact n-th largest is then found among the few candidates
    above that bound. If the bound was too high (too few candidates) it falls back to a full
    linear-time selection, so the result never depends on the sample."""
    total = values.numel()
    if n >= total:
        return torch.arange(total, device=values.device)
    sample = values[:: max(1, total // 200_000)]
    n_sample = min(sample.numel(), int(n * sample.numel() / total * 1.5) + 64)
    bound = torch.kthvalue(sample, sample.numel() - n_sample + 1).values
    candidates = torch.nonzero(values >= bound).squeeze(1)
    if candidates.numel() < n:
        candidates = torch.arange(total, device=values.device)
    cand_values = values[candidates]
    threshold = torch.kthvalue(cand_values, cand_values.numel() - n + 1).values
    above = candidates[cand_values > threshold]
    ties = candidates[cand_values == threshold][: n - above.numel()]
    return torch.cat([above, ties])


@register("mutual_choice", label="Mutual Choice", color="#2ca02c", inference_threshold="global")
def mutual_choice(z: Tensor, ctx: AllocationContext) -> Tensor:
    """The k * n_tokens largest entries of the whole matrix (the same selection as BatchTopK):
    tokens and features compete freely for one shared budget."""
    z_flat = z.flatten()
    budget = ctx.k * z.shape[0] * distributed.world_size()
    # Whatever this rank contributes to the global winners is among its own top `budget`.
    kept = top_n_indices(z_flat, budget)
    if distributed.is_distributed():
        kept = _global_winners(z_flat, kept, budget)
    return _positive(z_flat, kept).sort().values


def _global_winners(z_flat: Tensor, candidates: Tensor, budget: int) -> Tensor:
    """The entries among this rank's ``candidates`` (its own top ``budget``) that are among the global
    batch's ``budget`` largest. Ties at the global threshold are broken by global position, rank-major
    and then row-major (rank r holds the r-th slice of the global batch), as one process breaks them
    by position: the earlier ranks' tied entries are kept first, so exactly ``budget`` entries are
    kept over all ranks even when bfloat16 pre-activations tie at the threshold."""
    values = z_flat[candidates]
    pooled = distributed.all_gather_ragged(values)
    if pooled.numel() <= budget:
        return candidates
    threshold = torch.kthvalue(pooled, pooled.numel() - budget + 1).values
    above = candidates[values > threshold]
    tied = candidates[values == threshold].sort().values
    counts = distributed.all_gather(torch.tensor([above.numel(), tied.numel()], device=z_flat.device))
    tied_before = int(counts[: distributed.rank(), 1].sum())
    mine = min(max(budget - int(counts[:, 0].sum()) - tied_before, 0), tied.numel())
    return torch.cat([above, tied[:mine]])


def zipf_profile(n_features: int, k: float, exponent: float) -> Tensor:
    """Target matches per token for each feature rank: proportional to (r + 1) ** -exponent,
    at most 1 (a feature matches a token at most once) and summing to k.

    Mass cut from a capped rank is spread over the uncapped ranks in proportion to their Zipf
    weight (water-filling)."""
    if not 0 < k <= n_features:
        raise ValueError(f"k must be in 1..{n_features} (the number of features), got {k}")
    weight = torch.arange(1, n_features + 1, dtype=torch.float64) ** -exponent
    capped = torch.zeros(n_features, dtype=torch.bool)
    while True:
        free = torch.where(capped, 0.0, weight)
        profile = torch.where(capped, 1.0, (k - capped.sum()) * free / free.sum())
        over = (profile > 1) & ~capped
        if not over.any():
            return profile
        capped |= over


@functools.lru_cache(maxsize=64)
def zipf_capacities(n_features: int, n_tokens: int, k: int, exponent: float, min_tokens: int = 0) -> Tensor:
    """Integer capacities m_r per feature rank for a batch of n_tokens: ``min_tokens`` for every rank,
    and the rest of the budget shared by the Zipf profile, rounded by largest remainder so that
    sum m_r = k * n_tokens exactly.

    With ``min_tokens=0`` (the pure Zipf share) the tail ranks of a large dictionary get no token at
    all in a small batch, so those features cannot fire while they hold those ranks. With
    ``min_tokens=1`` every feature picks at least its best token in every batch, the property Feature
    Choice's "no dead features" rests on. Where the floor alone exceeds the budget
    (min_tokens * n_features > k * n_tokens) every rank gets the floor and the batch spends more than k
    per token."""
    floor_total = min_tokens * n_features
    if floor_total >= k * n_tokens:
        return torch.full((n_features,), min_tokens, dtype=torch.long)
    room = n_tokens - min_tokens  # each rank can take at most this many tokens above its floor
    rest = k * n_tokens - floor_total
    target = zipf_profile(n_features, rest / room, exponent) * room
    capacity = target.floor()
    shortfall = rest - int(capacity.sum())
    remainder = torch.where(capacity < room, target - capacity, -1.0)
    capacity[remainder.topk(shortfall).indices] += 1
    return capacity.long() + min_tokens


@functools.lru_cache(maxsize=64)
def uniform_capacities(n_features: int, n_tokens: int, k: int) -> Tensor:
    """One capacity m = k * n_tokens / n_features for every rank (the abstract's "each feature matches
    with at most m tokens"), in integers: floor(m) for every rank and one more for the first
    (k * n_tokens mod n_features) ranks, so the budget is exact. At least one token per rank: where
    the budget is under one token per feature, every rank still gets one (and the batch spends more
    than k per token)."""
    base, extra = divmod(k * n_tokens, n_features)
    if base == 0:
        return torch.ones(n_features, dtype=torch.long)
    capacity = torch.full((n_features,), base, dtype=torch.long)
    capacity[:extra] += 1
    return capacity


def choose_tokens(z: Tensor, ctx: AllocationContext, capacity_by_rank: Tensor) -> Tensor:
    """Feature Choice's selection: each feature i keeps its top m_i tokens, m_i the capacity of the
    rank it holds (``ctx.feature_rank``, default: feature index).

    Features are processed in buckets of similar capacity so each bucket needs one top-k with a small
    k (most features are in the Zipf tail and need a handful of tokens), rather than a full sort of
    every column."""
    n_tokens, n_features = z.shape
    rank = ctx.feature_rank if ctx.feature_rank is not None else torch.arange(n_features)
    capacity = capacity_by_rank[rank.cpu()].to(z.device)
    z_by_feature = z.t()  # contiguous: the SAE computes z feature-major for these rules
    kept = []
    bucket = torch.ceil(torch.log2(capacity.clamp(min=1).double())).long()
    for b in torch.unique(bucket[capacity > 0]).tolist():
        features = torch.nonzero((bucket == b) & (capacity > 0)).squeeze(1)
        width = min(2**b, n_tokens)
        vals, tokens = z_by_feature[features].topk(width, dim=1, sorted=True)
        if distributed.is_distributed():
            # The m_i-th largest value of feature i over all ranks' candidates is its threshold.
            pooled = distributed.all_gather(vals).permute(1, 0, 2).reshape(len(features), -1)
            cutoff = pooled.topk(min(2**b, pooled.shape[1]), dim=1).values
            threshold = cutoff.gather(1, capacity[features, None] - 1)
            keep = (vals >= threshold) & (vals > 0)
        else:
            keep = (torch.arange(width, device=z.device)[None, :] < capacity[features, None]) & (vals > 0)
        kept.append((tokens * n_features + features[:, None])[keep])
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=z.device)
    return torch.cat(kept).sort().values


def _global_tokens(z: Tensor) -> int:
    """Tokens of the global batch (all data-parallel ranks): batch-level capacities are set for it."""
    return z.shape[0] * distributed.world_size()


@register("feature_choice", label="Feature Choice", color="#d62728", inference_threshold="per_feature",
          feature_major=True, revision=1)
def feature_choice(z: Tensor, ctx: AllocationContext) -> Tensor:
    """Each feature i keeps its top m_i tokens: one token for every feature, the rest of the budget
    k * n_tokens shared by a Zipf profile over feature rank (``zipf_capacities(min_tokens=1)``).

    The paper's abstract defines FC by "each feature matches with at most m tokens" and claims no dead
    features; its capacities are reported to follow a Zipf law. This is the book's reading of both:
    Zipf shares, but never below one token, so every feature picks its own best token in every batch.
    Revision 1: until then this name meant the pure Zipf share (now ``feature_choice_unfloored``)."""
    capacity = zipf_capacities(z.shape[1], _global_tokens(z), ctx.k, ctx.zipf_exponent, min_tokens=1)
    return choose_tokens(z, ctx, capacity)


@register("feature_choice_uniform", label="FC (uniform m)", color="#8c564b", inference_threshold="per_feature",
          feature_major=True)
def feature_choice_uniform(z: Tensor, ctx: AllocationContext) -> Tensor:
    """Each feature keeps its top m = k * n_tokens / n_features tokens (``uniform_capacities``)."""
    return choose_tokens(z, ctx, uniform_capacities(z.shape[1], _global_tokens(z), ctx.k))


@register("feature_choice_unfloored", label="FC (Zipf, no floor)", color="#e377c2",
          inference_threshold="per_feature", feature_major=True)
def feature_choice_unfloored(z: Tensor, ctx: AllocationContext) -> Tensor:
    """Each feature keeps its top m_r tokens, m_r the pure Zipf share of its rank (``zipf_capacities``
    with no floor): in a batch where a rank's share rounds to zero, the feature holding it cannot fire."""
    return choose_tokens(z, ctx, zipf_capacities(z.shape[1], _global_tokens(z), ctx.k, ctx.zipf_exponent))


def selection_mask(rule: str, z: Tensor, ctx: AllocationContext) -> Tensor:
    """Boolean [tokens, features] matrix of the entries ``rule`` keeps from ``z`` (to draw or test)."""
    mask = torch.zeros(z.numel(), dtype=torch.bool, device=z.device)
    mask[get_rule(rule).select(z, ctx)] = True
    return mask.view_as(z)


def threshold_select(z: Tensor, threshold: Tensor) -> Tensor:
    """Inference encoding for batch-level rules: keep entries above the tracked threshold."""
    return torch.nonzero((z > threshold).flatten() & (z.flatten() > 0)).squeeze(1)
