"""Feature browser, part 1: what each feature does, gathered from an activation table.

Readers understand a feature by its examples, so for each feature this module gathers, over a token
budget of an activation table, its density, a histogram of its activations, its top-activating
contexts (every token of the window shaded by the feature's activation), samples from each quantile
bin of its activations (not only the top) and the output tokens its decoder direction promotes and
suppresses through the unembedding.

``gather_features`` reads the table once and encodes each batch with every SAE (the expensive
part). It keeps only the sparse codes, 10 bytes per kept entry (64 MB for 200k tokens at L0 32),
sorts them by feature and descending value, and computes everything per feature from them.

Units: activations are the SAE's codes, in its normalised units (the contribution to the input is
``value * decoder_row / input_scale``). Logit effects use the decoder rows directly (unit norm, the
feature's direction; dividing by ``input_scale`` would scale every entry alike), read through the
final norm's weight (and its centring, for LayerNorm) and ``W_U``: the change in each logit when the
residual moves one unit along the direction, ignoring the norm's rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from saelib.core import seeding
from saelib.core.devices import to_device_of
from saelib.core.hooks import parse_hook
from saelib.core.progress import bar as progress_bar
from saelib.core.sae import SAE

__all__ = ["TokenIndex", "FeatureData", "gather_features", "logit_effects"]

# ============================================================================ which token a row is

@dataclass
class TokenIndex:
    """Row ``r`` of an activation table is token ``windows[window[r], position[r]]``."""

    windows: np.ndarray
    """int [n_windows, context]: the token windows the activations were harvested from."""
    window: np.ndarray
    position: np.ndarray

    def __post_init__(self) -> None:
        self.windows = np.asarray(self.windows)
        self.window, self.position = np.asarray(self.window, np.int64), np.asarray(self.position, np.int64)
        if self.windows.ndim != 2 or self.window.shape != self.position.shape:
            raise ValueError(f"TokenIndex needs windows [n_windows, context] and one window and position per row; "
                             f"got windows {self.windows.shape}, {self.window.shape} and {self.position.shape}")
        if len(self.window) and (self.window.max() >= len(self.windows) or self.position.max() >= self.windows.shape[1]):
            raise ValueError("TokenIndex: a row points outside the windows")

    @classmethod
    def from_table(cls, table, n_rows: int | None = None) -> "TokenIndex":
        """The index of a table that knows its tokens (``.tokens`` and ``.locate``: an ActivationCache,
        or a RowSubset of one)."""
        if not (hasattr(table, "tokens") and hasattr(table, "locate")):
            raise TypeError(f"{type(table).__name__} does not say which token each row is (no .tokens and .locate); "
                            "pass tokens=TokenIndex.from_windows(windows) with the windows it was harvested from")
        window, position = table.locate(np.arange(len(table) if n_rows is None else n_rows))
        return cls(np.asarray(table.tokens), window, position)

    @classmethod
    def from_windows(cls, windows: Tensor | np.ndarray, exclude_bos: bool = True) -> "TokenIndex":
        """The index of ``saelib.subjects.activations.harvest(model, hooks, windows, exclude_bos=...)``'s rows."""
        windows = np.asarray(windows.cpu() if isinstance(windows, Tensor) else windows)
        first = int(exclude_bos)
        rows = np.arange(len(windows) * (windows.shape[1] - first))
        return cls(windows, rows // (windows.shape[1] - first), first + rows % (windows.shape[1] - first))

    def row_at(self, n_rows: int) -> Tensor:
        """[n_windows, context]: the row (< n_rows) at each window position, -1 where none was scanned."""
        out = torch.full(self.windows.shape, -1, dtype=torch.long)
        out[torch.from_numpy(self.window[:n_rows]), torch.from_numpy(self.position[:n_rows])] = torch.arange(n_rows)
        return out


# ============================================================================ gathering

@dataclass
class FeatureData:
    """What the browser shows of every feature of one SAE, over the first ``n_tokens`` rows of a table.

    Example rows are -1 (values 0) where a feature has fewer examples; contexts are the feature's
    activation at offsets ``-before..after`` of the example's token, NaN where no scanned row is."""

    name: str
    n_tokens: int
    count: Tensor
    """[F] rows where the feature fired."""
    max: Tensor
    """[F] largest activation (0 if it never fired)."""
    hist: Tensor
    """[F, n_bins] counts of nonzero activations in equal bins from 0 to the feature's max."""
    top_rows: Tensor
    """[F, n_top] rows of the highest activations, descending."""
    top_values: Tensor
    quantile_edges: Tensor
    """[F, n_quantiles + 1] smallest activation of each quantile bin (ascending; 0 if empty), then the max."""
    sample_rows: Tensor
    """[F, n_quantiles, n_samples] rows sampled (stratified) from each quantile bin, lowest bin first."""
    sample_values: Tensor
    top_context: Tensor
    """[F, n_top, before + 1 + after] activations around each top example."""
    sample_context: Tensor
    """[F, n_quantiles, n_samples, before + 1 + after]."""
    tokens: TokenIndex = field(repr=False)
    before: int = 16
    after: int = 7
    promoted: Tensor | None = None
    """[F, n_logits] token ids with the largest logit effect of the decoder direction, descending."""
    promoted_logits: Tensor | None = None
    suppressed: Tensor | None = None
    """[F, n_logits] token ids with the most negative effect, most negative first."""
    suppressed_logits: Tensor | None = None
    logit_note: str = ""
    """Why there are no logit effects (empty when there are)."""

    @property
    def density(self) -> Tensor:
        return self.count / self.n_tokens

    def context_ids(self, row: int) -> list[int | None]:
        """Token ids at offsets ``-before..after`` of a row's token (None outside its window)."""
        w, p = int(self.tokens.window[row]), int(self.tokens.position[row])
        ids = self.tokens.windows[w]
        return [int(ids[q]) if 0 <= q < len(ids) else None for q in range(p - self.before, p + self.after + 1)]


def gather_features(saes: Mapping[str, SAE], table, *, tokens: TokenIndex | None = None, n_tokens: int | None = None,
                    model=None, hook: str | None = None, batch_size: int = 4096, n_top: int = 8,
                    n_quantiles: int = 4, n_samples: int = 4, n_bins: int = 32, before: int = 16, after: int = 7,
                    n_logits: int = 10, seed: int = 0, progress: bool = True) -> dict[str, FeatureData]:
    """Gather every feature of every SAE over the first ``n_tokens`` rows of ``table`` in one pass.

    ``table`` is any activation table (``len``, ``table[LongTensor] -> [n, d_in]``); ``tokens`` says
    which token each row is (default: ``TokenIndex.from_table(table)``). ``model`` (a
    HookedTransformer) adds the logit effects unless ``hook`` is given and is not in the residual basis."""
    if not saes:
        raise ValueError("gather_features needs at least one SAE")
    widths = {name: sae.cfg.d_in for name, sae in saes.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"the SAEs read activations of different widths {widths}: gather them separately")
    n = len(table) if n_tokens is None else min(int(n_tokens), len(table))
    if n <= 0:
        raise ValueError(f"no rows to scan: the table has {len(table)} rows and n_tokens={n_tokens}")
    tokens = TokenIndex.from_table(table, n) if tokens is None else tokens
    if len(tokens.window) < n:
        raise ValueError(f"the TokenIndex covers {len(tokens.window)} rows but {n} are scanned")
    codes = _encode_all(saes, table, n, batch_size, progress)
    row_at = tokens.row_at(n)
    gen = seeding.generator("browser_samples", seed)
    out = {}
    for name, sae in saes.items():
        data = _summarise(name, *codes[name], sae.cfg.d_sae, n, tokens, row_at, gen, n_top, n_quantiles,
                          n_samples, n_bins, before, after)
        _add_logit_effects(data, sae, model, hook, n_logits)
        out[name] = data
    return out


@torch.no_grad()
def _encode_all(saes: Mapping[str, SAE], table, n: int, batch_size: int,
                progress: bool) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """The one pass over the table: (rows, features, values) of every SAE's kept entries."""
    parts: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {name: [] for name in saes}
    modes = {name: sae.training for name, sae in saes.items()}
    try:
        for sae in saes.values():
            sae.eval()
        for lo in progress_bar(range(0, n, batch_size), show=progress, desc="browser: encoding", unit="batch"):
            x = table[torch.arange(lo, min(n, lo + batch_size))].float()
            for name, sae in saes.items():
                c = sae(to_device_of(x, sae)).codes
                col_dtype = torch.int16 if sae.cfg.d_sae < 2 ** 15 else torch.int32
                parts[name].append(((c.rows + lo).int().cpu(), c.cols.to(col_dtype).cpu(), c.values.float().cpu()))
    finally:
        for name, sae in saes.items():
            sae.train(modes[name])
    return {name: tuple(torch.cat(t) for t in zip(*p)) for name, p in parts.items()}  # type: ignore[misc]


def _summarise(name: str, rows: Tensor, cols: Tensor, vals: Tensor, n_features: int, n: int, tokens: TokenIndex,
               row_at: Tensor, gen: torch.Generator, n_top: int, n_quantiles: int, n_samples: int, n_bins: int,
               before: int, after: int) -> FeatureData:
    """Per-feature statistics and examples from the codes, sorted by feature then descending value."""
    order = torch.argsort(vals, descending=True, stable=True)
    order = order[torch.argsort(cols[order], stable=True)]
    r, c, v = rows[order].long(), cols[order].long(), vals[order]
    count = torch.bincount(c, minlength=n_features)
    start = torch.cumsum(count, 0) - count
    # Index len(v) is a sentinel (row -1, value 0) for the examples a feature does not have.
    r_pad, v_pad = torch.cat([r, r.new_tensor([-1])]), torch.cat([v, v.new_zeros(1)])
    vmax = torch.where(count > 0, v_pad[torch.where(count > 0, start, len(v))], 0.0)
    bins = (v / vmax[c] * n_bins).long().clamp_(0, n_bins - 1)
    hist = torch.bincount(c * n_bins + bins, minlength=n_features * n_bins).view(n_features, n_bins)

    j = torch.arange(n_top)
    top = torch.where(j < count[:, None], start[:, None] + j, len(v))
    # Quantile bin b holds ascending ranks [b n / Q, (b + 1) n / Q); rank a sits at start + n - 1 - a.
    b = torch.arange(n_quantiles + 1)
    lo_rank = (b * count[:, None]) // n_quantiles  # [F, Q + 1]
    size = (lo_rank[:, 1:] - lo_rank[:, :-1])[..., None]  # [F, Q, 1]
    # Stratified: sample s is uniform in the s-th of n_samples equal slices of the bin (all of a small bin).
    s = torch.arange(n_samples + 1)
    cut = (s * size) // n_samples  # [F, Q, S + 1]
    u = torch.rand(n_features, n_quantiles, n_samples, generator=gen)
    s = s[:-1]
    within = torch.where(size >= n_samples, cut[..., :-1] + (u * (cut[..., 1:] - cut[..., :-1])).long(), s)
    rank = lo_rank[:, :-1, None] + within
    sample = torch.where(s < size, start[:, None, None] + count[:, None, None] - 1 - rank, len(v))
    # Edges: each bin's smallest value (its lowest ascending rank; 0 for an empty bin), then the max.
    lowest = torch.where(size[..., 0] > 0, start[:, None] + count[:, None] - 1 - lo_rank[:, :-1], len(v))
    edges = torch.cat([v_pad[lowest], vmax[:, None]], 1)

    keys, perm = torch.sort(rows.long() * n_features + cols.long())
    lookup = (keys, vals[perm])
    feats = torch.arange(n_features)
    return FeatureData(
        name=name, n_tokens=n, count=count, max=vmax, hist=hist, top_rows=r_pad[top], top_values=v_pad[top],
        quantile_edges=edges, sample_rows=r_pad[sample], sample_values=v_pad[sample],
        top_context=_contexts(r_pad[top], feats[:, None].expand(-1, n_top), tokens, row_at, lookup, n_features,
                              before, after),
        sample_context=_contexts(r_pad[sample], feats[:, None, None].expand_as(sample), tokens, row_at, lookup,
                                 n_features, before, after),
        tokens=tokens, before=before, after=after)


def _contexts(ex_rows: Tensor, ex_feats: Tensor, tokens: TokenIndex, row_at: Tensor,
              lookup: tuple[Tensor, Tensor], n_features: int, before: int, after: int) -> Tensor:
    """[..., before + 1 + after]: feature ``ex_feats``'s activation around each example row (NaN where
    there is no scanned row: outside the window, unscanned positions, padding examples)."""
    shape = ex_rows.shape
    ex_rows, ex_feats = ex_rows.reshape(-1), ex_feats.reshape(-1)
    safe = ex_rows.clamp(min=0).numpy()
    w = torch.from_numpy(tokens.window[safe])[:, None]
    q = torch.from_numpy(tokens.position[safe])[:, None] + torch.arange(-before, after + 1)
    inside = (q >= 0) & (q < row_at.shape[1]) & (ex_rows[:, None] >= 0)
    nearby = torch.where(inside, row_at[w, q.clamp(0, row_at.shape[1] - 1)], -1)
    keys, values = lookup
    want = nearby * n_features + ex_feats[:, None]
    at = torch.searchsorted(keys, want).clamp(max=max(len(keys) - 1, 0))
    found = (keys[at] == want) if len(keys) else torch.zeros_like(want, dtype=torch.bool)
    acts = torch.where(found, values[at] if len(keys) else 0.0, 0.0)
    return torch.where(nearby >= 0, acts, float("nan")).reshape(*shape, -1)


# ============================================================================ logit effects

@torch.no_grad()
def logit_effects(decoder: Tensor, model, k: int = 10, chunk: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(promoted ids, their logits, suppressed ids, their logits), each [F, k], of each decoder row
    read through the model's final norm weight (centred first for LayerNorm) and ``W_U``."""
    directions = decoder.detach().float().to(model.W_U.device)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        directions = directions - directions.mean(1, keepdim=True)
    weight = getattr(getattr(model, "ln_final", None), "w", None)
    unembed = model.W_U.float() * (weight.float()[:, None] if weight is not None else 1.0)
    k = min(k, unembed.shape[1])
    out: list[list[Tensor]] = [[], [], [], []]
    for lo in range(0, len(directions), chunk):
        logits = directions[lo:lo + chunk] @ unembed
        hi, low = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        for part, t in zip(out, (hi.indices, hi.values, low.indices, low.values)):
            part.append(t.cpu())
    return tuple(torch.cat(p) for p in out)  # type: ignore[return-value]


def _add_logit_effects(data: FeatureData, sae: SAE, model, hook: str | None, k: int) -> None:
    if model is None or not hasattr(model, "W_U"):
        data.logit_note = "no model given: no logit effects"
    elif sae.cfg.d_in != model.cfg.d_model or (hook is not None and not parse_hook(hook).in_residual_basis):
        data.logit_note = f"the hook {hook or ''} is not in the residual stream's basis: no logit effects"
    else:
        data.promoted, data.promoted_logits, data.suppressed, data.suppressed_logits = logit_effects(
            sae.decoder, model, k)


