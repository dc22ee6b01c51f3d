"""Behavioural probes of a subject model: what it does, measured by intervening on its input.

Chapter 4 relates SAE features to what a model can do at each training checkpoint. The central
ability is in-context copying (Olsson et al. 2022): a span of tokens is hard to predict the first
time and easy the second time for a model that copies from context (an induction head: find the
earlier occurrence of the current token, attend to what followed it, predict that). The loss drop
from the first occurrence to the second (the ICL score) measures it.

One layout is not enough. The classic probe, BOS + L random tokens + the same L tokens
(``repeated_sequences``), puts the copy at a fixed offset L, which a *positional* copier (attend to
position t - L, whatever the tokens) solves as well as an induction head. ``repeat_spans`` copies a
span of each window to a random later place, at a random distance; only a copier that looks the
tokens up scores on it, at every span length. The attention diagnostics then name the heads:
``prefix_matching`` (an induction head's attention to the token after the current token's earlier
occurrence) and ``previous_token`` (the layer-0 half of the circuit, attention to t - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelib.core import seeding

__all__ = ["repeated_sequences", "random_windows", "RepeatProbe", "copy_spans", "repeat_spans", "ICLScore", "icl_score",
           "mean_loss", "loss_by_position", "attention_patterns", "prefix_matching", "previous_token", "Rise", "steepest_rise"]


def _allowed_ids(vocab: int, bos: int, exclude: tuple[int, ...]) -> Tensor:
    allowed = torch.ones(vocab, dtype=torch.bool)
    banned = torch.tensor(sorted({bos, *exclude}), dtype=torch.long)
    allowed[banned[banned < vocab]] = False
    if allowed.sum() < 2:
        raise ValueError(f"need two allowed token ids; {int(allowed.sum())} allowed of {vocab}")
    return allowed.nonzero().flatten()


def repeated_sequences(n_sequences: int, length: int, vocab: int, bos: int, seed: int = 0,
                       exclude: tuple[int, ...] = ()) -> Tensor:
    """[n_sequences, 1 + 2 * length]: BOS, then ``length`` token ids drawn uniformly from
    ``0..vocab-1`` (never BOS or an id in ``exclude``, e.g. EOS), then the same ``length`` ids again:
    the fixed-offset layout (``RepeatProbe.halves`` reads it). Drawn from their own random stream,
    so the probe is the same at every checkpoint."""
    if length < 2 or n_sequences < 1:
        raise ValueError(f"need length >= 2 and n_sequences >= 1; got length={length}, n_sequences={n_sequences}")
    pool = _allowed_ids(vocab, bos, exclude)
    gen = seeding.generator("icl_sequences", seed)
    body = pool[torch.randint(len(pool), (n_sequences, length), generator=gen)]
    return torch.cat([torch.full((n_sequences, 1), bos), body, body], dim=1)


def random_windows(n_windows: int, context: int, vocab: int, bos: int, seed: int = 0,
                   exclude: tuple[int, ...] = ()) -> Tensor:
    """[n_windows, context]: BOS then uniformly random token ids (no n-gram a model could know),
    the canvas ``repeat_spans`` copies into."""
    pool = _allowed_ids(vocab, bos, exclude)
    gen = seeding.generator("icl_sequences:windows", seed)
    body = pool[torch.randint(len(pool), (n_windows, context - 1), generator=gen)]
    return torch.cat([torch.full((n_windows, 1), bos), body], dim=1)


@dataclass(frozen=True)
class RepeatProbe:
    """Windows in which ``length`` tokens starting at ``first[i]`` recur starting at ``second[i]``."""

    tokens: Tensor
    """[n, T] token ids."""
    first: Tensor
    """[n] start of the first occurrence (> 0: BOS stays)."""
    second: Tensor
    """[n] start of the copy, >= first + length (the occurrences do not overlap)."""
    length: int

    def __post_init__(self) -> None:
        n, t = self.tokens.shape
        if self.length < 2 or len(self.first) != n or len(self.second) != n:
            raise ValueError(f"need length >= 2 and one (first, second) per window; got length={self.length}, "
                             f"{len(self.first)} / {len(self.second)} offsets for {n} windows")
        if (self.first < 1).any() or (self.second < self.first + self.length).any() or \
                (self.second + self.length > t).any():
            raise ValueError("offsets must satisfy 1 <= first, first + length <= second, second + length <= T")
        span = torch.arange(self.length)
        a = self.tokens.gather(1, self.first[:, None] + span)
        b = self.tokens.gather(1, self.second[:, None] + span)
        if not torch.equal(a, b):
            raise ValueError("the two occurrences differ: build the probe with repeat_spans or RepeatProbe.halves")

    @classmethod
    def halves(cls, sequences: Tensor) -> "RepeatProbe":
        """The fixed-offset layout of ``repeated_sequences``: BOS + x + x, the copy L tokens later."""
        if sequences.ndim != 2 or sequences.shape[1] % 2 != 1 or sequences.shape[1] < 5:
            raise ValueError(f"expected [n, 1 + 2 * length] sequences (BOS + two copies, length >= 2), "
                             f"got shape {tuple(sequences.shape)}")
        n, length = len(sequences), (sequences.shape[1] - 1) // 2
        return cls(sequences, torch.ones(n, dtype=torch.long), torch.full((n,), 1 + length), length)

    @property
    def offset(self) -> Tensor:
        """[n] distance from each first occurrence to its copy."""
        return self.second - self.first


def copy_spans(windows: Tensor, lengths: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, first, second): each window with its span of ``lengths[i]`` tokens at ``first[i]``
    copied over the stretch at ``second[i]``, both places (so the distance) drawn from ``gen``:
    ``first`` uniform in [1, T - 2L], then ``second`` uniform in [first + L, T - L]. The probes'
    layout and the repeats of the organism's training text (``train_organism``'s ``repeat_frac``)."""
    n, t = windows.shape
    if len(lengths) != n or (lengths < 2).any() or (2 * lengths + 1 > t).any():
        raise ValueError(f"every span length must satisfy 2 <= L and 2 * L + 1 <= {t} (the window)")
    first = 1 + (torch.rand(n, generator=gen) * (t - 2 * lengths)).long()
    second = first + lengths + (torch.rand(n, generator=gen) * (t - lengths - first - lengths + 1)).long()
    tokens = windows.clone()
    span = torch.arange(t)
    inside = span < lengths[:, None]  # [n, T]: the first L positions of a span of length L
    src = (first[:, None] + span).clamp(max=t - 1)
    dst = (second[:, None] + span).clamp(max=t - 1)
    rows = torch.arange(n)[:, None].expand(n, t)
    tokens[rows[inside], dst[inside]] = windows[rows[inside], src[inside]]
    return tokens, first, second


def repeat_spans(windows: Tensor, length: int, seed: int = 0) -> RepeatProbe:
    """A probe: a ``length``-token span of each window copied to a random later place, at a random
    distance (``copy_spans``, seeded): text stays text before the copy, and no fixed offset gives
    the copy away."""
    gen = seeding.generator("icl_sequences:spans", seed)
    tokens, first, second = copy_spans(windows, torch.full((len(windows),), length), gen)
    return RepeatProbe(tokens, first, second, length)


@dataclass
class ICLScore:
    first: float
    """Mean next-token loss (nats) on the first occurrence, its first token left out."""
    second: float
    """Mean loss on the copy, its first token left out (nothing yet says a copy began)."""

    @property
    def score(self) -> float:
        """first - second: about 0 for a model that does not use the context, up to the first
        occurrence's loss for one that copies perfectly."""
        return self.first - self.second


def _device_of(model, fallback: torch.device) -> torch.device:
    params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return params.device if params is not None else fallback


@torch.no_grad()
def _token_losses(model, tokens: Tensor, batch_size: int) -> Tensor:
    """[n, T - 1]: the loss of predicting token t + 1 from tokens up to t."""
    device = _device_of(model, tokens.device)
    out = []
    for lo in range(0, len(tokens), batch_size):
        batch = tokens[lo:lo + batch_size].to(device)
        logits = model(batch).float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        out.append(-logp.gather(-1, batch[:, 1:, None].to(logp.device)).squeeze(-1).cpu())
    return torch.cat(out)


def _span_mean(losses: Tensor, start: Tensor, length: int) -> float:
    # losses[:, t] predicts token t + 1: tokens start+1 .. start+L-1 are losses start .. start+L-2.
    idx = start[:, None] + torch.arange(length - 1)
    return float(losses.gather(1, idx).mean())


def icl_score(model, probe: RepeatProbe, batch_size: int = 16) -> ICLScore:
    """Losses on the two occurrences of ``probe``'s span under ``model`` (anything mapping token
    ids [n, T] to logits [n, T, vocab], e.g. a HookedTransformer)."""
    losses = _token_losses(model, probe.tokens, batch_size)
    return ICLScore(_span_mean(losses, probe.first, probe.length), _span_mean(losses, probe.second, probe.length))


@torch.no_grad()
def mean_loss(model, windows: Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss (nats/token) of ``model`` over every predicted position of ``windows``."""
    return float(_token_losses(model, windows, batch_size).mean())


@torch.no_grad()
def loss_by_position(model, windows: Tensor, batch_size: int = 16) -> Tensor:
    """[T - 1]: the mean loss of predicting token t + 1, per position t (Olsson et al.'s in-context
    learning curve on natural text: it falls with t for a model that uses its context)."""
    return _token_losses(model, windows, batch_size).mean(0)


@torch.no_grad()
def attention_patterns(model, tokens: Tensor, batch_size: int = 16) -> Tensor:
    """[n, layers, heads, T, T]: every head's attention pattern (query, key) on ``tokens``, from a
    TransformerLens ``HookedTransformer``'s ``hook_pattern``."""
    device = _device_of(model, tokens.device)
    out = []
    for lo in range(0, len(tokens), batch_size):
        _, cache = model.run_with_cache(tokens[lo:lo + batch_size].to(device),
                                        names_filter=lambda name: name.endswith("hook_pattern"))
        out.append(torch.stack([cache["pattern", layer].float().cpu() for layer in range(model.cfg.n_layers)], 1))
    return torch.cat(out)


def prefix_matching(model, probe: RepeatProbe, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """([layers, heads] score, chance): each head's mean attention from a token of the copy to the
    token that followed the same token's first occurrence (query second + i, key first + i + 1, for
    i < length - 1), and what uniform attention over the causal past would give on the same queries.
    Near 1 for an induction head, near chance for a head that ignores the tokens."""
    pattern = attention_patterns(model, probe.tokens, batch_size)
    i = torch.arange(probe.length - 1)
    query = probe.second[:, None] + i  # [n, L-1]
    key = probe.first[:, None] + i + 1
    rows = torch.arange(len(query))[:, None]
    score = pattern[rows, :, :, query, key]  # [n, L-1, layers, heads]
    chance = float((1.0 / (query + 1).float()).mean())
    return score.mean((0, 1)), torch.tensor(chance)


def previous_token(model, windows: Tensor, batch_size: int = 16) -> Tensor:
    """[layers, heads]: each head's mean attention from token t to token t - 1 (t >= 1): the
    previous-token heads an induction head reads through."""
    pattern = attention_patterns(model, windows, batch_size)
    t = torch.arange(1, windows.shape[1])
    return pattern[:, :, :, t, t - 1].mean((0, 3))


@dataclass(frozen=True)
class Rise:
    rise: float
    """The largest increase of the curve between two probed steps at most ``window`` apart."""
    start: int
    """The step it rises from."""
    end: int
    """The step it rises to."""

    def overlaps(self, other: "Rise") -> bool:
        """Whether the two rises share part of their step interval (they happen together)."""
        return self.start < other.end and other.start < self.end


def steepest_rise(steps, values, window: int) -> Rise:
    """Where a probe curve (``values`` at training ``steps``, in order) jumps: the pair of probed
    steps at most ``window`` steps apart with the largest increase. A phase change shows as a rise
    over a short window about as large as the whole rise; a smooth curve gives a small one."""
    steps, values = [int(s) for s in steps], [float(v) for v in values]
    if len(steps) != len(values) or len(steps) < 2:
        raise ValueError(f"need at least two (step, value) pairs, got {len(steps)} steps and {len(values)} values")
    best = Rise(float("-inf"), steps[0], steps[1])
    for i, (s0, v0) in enumerate(zip(steps, values)):
        for s1, v1 in zip(steps[i + 1:], values[i + 1:]):
            if s1 - s0 > window:
                break
            if v1 - v0 > best.rise:
                best = Rise(v1 - v0, s0, s1)
    return best
