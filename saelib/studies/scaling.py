"""Training-length and dictionary-size studies: how a comparison of SAEs changes with scale.

One long run with ``TrainConfig.snapshot_steps`` gives every SAE at several training lengths
(``doubling_steps``); each snapshot is evaluated on held-out rows and on rows it trained on (the
overfitting check); ``gap_trend`` says in one word whether a ratio to the baseline moved towards 1
or away from it; ``first_tokens_at`` reads from a training history when a metric first reached a
level (e.g. when 1% of a dictionary had died).

Two families of SAEs compared along their whole frontiers (chapter 3's local vs e2e): ``ratio_at_equal``
reads the ratio of one quantity (L0) at equal values of another (CE increase) across the whole range
the two sweeps share, ``ratio_trend`` does so at every snapshot budget, and ``trend_verdict`` says
whether the median ratio rose, fell, stayed flat or moved both ways with training; ``seed_agreement``
is the cross-seed decoder cosine over alive features that goes beside it, with its chance level.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saelib.core.devices import to_device_of
from saelib.core.sae import SAE
from saelib.core.storage import atomic_text, content_key
from saelib.subjects.activations import RowSubset

TRENDS = ("closes", "stays", "widens")
RATIO_TRENDS = ("rising", "flat", "falling", "inconclusive")


def doubling_steps(steps: int, n: int) -> tuple[int, ...]:
    """``n`` training lengths ending at ``steps``, each twice the previous (rounded), ascending:
    doubling_steps(3000, 4) == (375, 750, 1500, 3000)."""
    if n < 1 or steps < 2 ** (n - 1):
        raise ValueError(f"cannot halve {steps} steps {n - 1} times and keep at least one step; "
                         "lower n or raise steps")
    return tuple(round(steps / 2 ** i) for i in reversed(range(n)))


def batch_allocated(sae: SAE) -> Callable[[Tensor], Tensor]:
    """x -> x_hat on [..., d_in] with the SAE's rule allocating over all the tokens of the call, as in
    training (FC and MC then spend exactly their budget, L0 = k, like TopK), on a fresh copy each
    call so that the SAE's running statistics never change. For ``saelib.studies.splice``: pass a batch of
    windows of about the training batch size."""
    def reconstruct(x: Tensor) -> Tensor:
        twin = copy.deepcopy(sae).train()
        with torch.no_grad():
            return twin(to_device_of(x.reshape(-1, x.shape[-1]), twin)).x_hat.reshape(x.shape).to(x.device)
    return reconstruct


def gap_trend(ratios: Sequence[float], tolerance: float = 0.02) -> str:
    """Whether a ratio to a baseline (e.g. NMSE over TopK's), measured at increasing training
    lengths, moved towards 1 ("closes"), away from it ("widens") or neither by more than
    ``tolerance`` ("stays"), comparing the longest run with the shortest. A ratio that crosses 1
    has closed the gap (and more): "closes"."""
    ratios = np.asarray(ratios, dtype=float)
    if ratios.size < 2 or not np.isfinite(ratios).all():
        raise ValueError(f"gap_trend needs at least two finite ratios, got {ratios.tolist()}")
    first, last = ratios[0] - 1, ratios[-1] - 1
    if np.sign(last) != np.sign(first) and abs(first) > tolerance:
        return "closes"
    change = abs(last) - abs(first)
    return "closes" if change < -tolerance else "widens" if change > tolerance else "stays"


def first_tokens_at(history: pd.DataFrame, sae: str, column: str, level: float) -> int | None:
    """Training tokens at the first logged step where ``column`` of SAE ``sae`` reached ``level``
    (``None`` if it never did). ``history`` is a ``TrainResult.history``."""
    rows = history[history.sae == sae]
    if rows.empty:
        raise KeyError(f"no SAE {sae!r} in the history; it has {sorted(history.sae.unique())}")
    reached = rows[rows[column] >= level]
    return None if reached.empty else int(reached.tokens.iloc[0])


def share_difference_floor(share_a: float, share_b: float, n: int) -> float:
    """Noise floor of a difference of two shares of ``n`` items each (e.g. the dead features of two
    dictionaries of ``n`` features), in the shares' units: two standard errors of the difference of two
    binomial proportions at their mean, 2 * sqrt(2 p (1 - p) / n). One seed per SAE, so this is the
    spread that chance alone would give two equally good SAEs; 0 where both shares are 0 or 1."""
    if n < 1 or not (0 <= share_a <= 1 and 0 <= share_b <= 1):
        raise ValueError(f"shares must be in [0, 1] of n >= 1 items, got {share_a}, {share_b} of {n}")
    p = (share_a + share_b) / 2
    return float(2 * np.sqrt(2 * p * (1 - p) / n))


def study_table(snapshots: Mapping[int, Mapping[str, SAE]], heldout: Tensor, seen: Tensor,
                batch_size: int, tokens_per_step: int, unseen: Tensor | None = None,
                splice: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per (snapshot step, SAE): NMSE on ``heldout`` rows (held-out documents), on ``seen``
    (rows it trained on) and on ``unseen`` (rows of the training documents it never trained on:
    the overfitting check compares these two, which differ only in having been trained on), all
    with batch allocation over batches of ``batch_size`` (L0 = k for TopK and MC, at most k for
    FC); inference-mode L0 and NMSE on ``heldout``; and with ``splice`` (keyword arguments of
    ``saelib.studies.splice.splice_sweep`` but the reconstructions: model, hook, windows, batch_size,
    max_norm) the CE increase with each SAE spliced in, batch-allocated.

    Columns: step, tokens, sae, L0, NMSE, NMSE (trained on), NMSE (unseen) (with unseen),
    L0 (inference), NMSE (inference), % never fired (on heldout, inference mode), CE increase
    (with splice)."""
    from saelib.core.metrics import evaluate
    from saelib.studies.splice import splice_sweep

    rows = []
    for step, saes in sorted(snapshots.items()):
        ce = {}
        if splice is not None:
            fns = {name: batch_allocated(sae) for name, sae in saes.items()}
            ce = {n: r.ce_increase for n, r in splice_sweep(reconstructs=fns, **splice).items()}
        for name, sae in saes.items():
            held = evaluate(sae, heldout, batch_size=batch_size, batch_allocation=True)
            train = evaluate(sae, seen, batch_size=batch_size, batch_allocation=True)
            infer = evaluate(sae, heldout, batch_size=batch_size)
            extra = {} if unseen is None else {"NMSE (unseen)": evaluate(
                sae, unseen, batch_size=batch_size, batch_allocation=True).nmse}
            rows.append({"step": step, "tokens": step * tokens_per_step, "sae": name,
                         "L0": held.l0, "NMSE": held.nmse, "NMSE (trained on)": train.nmse,
                         **extra,
                         "L0 (inference)": infer.l0, "NMSE (inference)": infer.nmse,
                         "% never fired": 100 * infer.dead_frac,
                         **({"CE increase": ce[name]} if ce else {})})
    return pd.DataFrame(rows)


def split_off_windows(rows: RowSubset, n_rows: int, rows_per_window: int
                      ) -> tuple[RowSubset, RowSubset]:
    """(rows of the first whole windows covering at least ``n_rows`` table rows, the rest): an
    activation table split at a window boundary, so that no window has rows on both sides. Train on
    the rest; the first part is the training documents' own never-trained-on sample."""
    cut = -(-n_rows // rows_per_window) * rows_per_window
    first = rows.rows < cut
    if first.all() or not first.any():
        raise ValueError(f"cannot split {len(rows)} rows at table row {cut}: one side is empty")
    return (RowSubset(rows.table, rows.rows[first], rows.threshold),
            RowSubset(rows.table, rows.rows[~first], rows.threshold))


def relative_to(table: pd.DataFrame, baseline: str, columns: Sequence[str]) -> pd.DataFrame:
    """``table`` (a ``study_table``) with "<column> / <baseline>" added for each of ``columns``:
    each SAE's value over the baseline SAE's at the same step."""
    base = table[table.sae == baseline].set_index("step")
    if base.empty:
        raise KeyError(f"no baseline SAE {baseline!r} in the table; it has {sorted(table.sae.unique())}")
    out = table.copy()
    for column in columns:
        out[f"{column} / {baseline}"] = out[column] / out.step.map(base[column])
    return out


def cached_table(folder: Path, name: str, key: Mapping[str, Any],
                 compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """``compute()`` once, stored as folder/tables/NAME-HASH.csv (HASH of ``key``, everything the
    table depends on besides what ``folder`` already identifies, e.g. a trained run's cache folder
    and the evaluation data's settings); later calls read it back. Evaluating every snapshot with
    its CE splice costs minutes; a rerun of a chapter should not repeat them."""
    return cached_tables(folder, (name,), key, lambda: {name: compute()})[name]


def cached_tables(folder: Path, names: Sequence[str], key: Mapping[str, Any],
                  compute: Callable[[], Mapping[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """``cached_table`` for several tables one computation makes (``compute()`` returns them by
    name): read back where every one is stored, else computed and stored."""
    digest = content_key(key, 12)
    paths = {name: Path(folder) / "tables" / f"{name}-{digest}.csv" for name in names}
    if all(path.exists() for path in paths.values()):
        return {name: pd.read_csv(path) for name, path in paths.items()}
    tables = compute()
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(tables[name].to_csv(index=False), path)  # a killed run leaves no half-written table
    return {name: tables[name] for name in names}


def ratio_at_equal(x_a: Sequence[float], y_a: Sequence[float], x_b: Sequence[float], y_b: Sequence[float],
                   n_points: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """(grid, y_a / y_b at each grid x): family a's y over family b's at equal x, each family's
    frontier interpolated as ``saelib.core.metrics.frontier_at`` does (log y linear in log x), on
    ``n_points`` log-spaced x values spanning the whole range the two families share. Empty arrays
    where the ranges do not overlap (or a family has fewer than two points): a single reading at one
    x would hide how much the ratio moves along the frontier."""
    from saelib.core.metrics import frontier_at

    xa, xb = np.asarray(x_a, dtype=float), np.asarray(x_b, dtype=float)
    if min(xa.size, xb.size) < 2 or not (np.all(xa > 0) and np.all(xb > 0)):
        return np.empty(0), np.empty(0)
    lo, hi = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    if not lo < hi:
        return np.empty(0), np.empty(0)
    grid = np.geomspace(lo, hi, n_points)
    ratio = np.array([frontier_at(x, xa, y_a) / frontier_at(x, xb, y_b) for x in grid])
    return grid, ratio


def ratio_trend(points: pd.DataFrame, numerator: str, denominator: str, x: str = "CE increase",
                y: str = "L0", family: str = "objective", budget: str = "tokens",
                n_points: int = 25) -> pd.DataFrame:
    """At each ``budget`` of ``points`` (one row per SAE and budget), ``ratio_at_equal`` of the
    ``numerator`` family's ``y`` over the ``denominator``'s at equal ``x``: one row per budget with the
    ratio's median, min and max over the shared x range, the range itself (x from, x to) and how many
    points each family has there. A budget without a shared range has NaN ratios."""
    rows = []
    for value, at in points.groupby(budget, sort=True):
        a, b = at[at[family] == numerator], at[at[family] == denominator]
        grid, ratio = ratio_at_equal(a[x], a[y], b[x], b[y], n_points)
        nan = float("nan")
        rows.append({budget: value, "median": float(np.median(ratio)) if ratio.size else nan,
                     "min": float(ratio.min()) if ratio.size else nan,
                     "max": float(ratio.max()) if ratio.size else nan,
                     f"{x} from": float(grid[0]) if grid.size else nan,
                     f"{x} to": float(grid[-1]) if grid.size else nan,
                     f"n {numerator}": len(a), f"n {denominator}": len(b)})
    return pd.DataFrame(rows)


def trend_verdict(medians: Sequence[float], tolerance: float = 0.1) -> tuple[str, float, float]:
    """(word, change, noise floor) for a ratio measured at increasing budgets. change = log(last /
    first); the floor is the larger of log(1 + tolerance) and the largest step between consecutive
    budgets against the overall direction (a trend smaller than the run's own back-and-forth is no
    trend). "rising" / "falling" where |change| exceeds the floor, "flat" where the change and every
    step stay within the tolerance, "inconclusive" otherwise (or where a budget has no reading).
    change and floor are what ``saelib.book.claims.Claim`` takes as difference and noise_floor."""
    values = np.asarray(medians, dtype=float)
    tol = float(np.log1p(tolerance))
    if values.size < 2 or not (np.isfinite(values).all() and (values > 0).all()):
        return "inconclusive", float("nan"), tol
    logs = np.log(values)
    change, steps = float(logs[-1] - logs[0]), np.diff(logs)
    against = -steps if change >= 0 else steps
    floor = max(tol, float(against.max()))
    if abs(change) > floor:
        return ("rising" if change > 0 else "falling"), change, floor
    if np.all(np.abs(steps) <= tol):
        return "flat", change, floor
    return "inconclusive", change, floor


def seed_agreement(a: Tensor, b: Tensor) -> float:
    """Median over the rows of ``a`` of the largest cosine with any row of ``b``: how far two
    dictionaries (decoder rows, e.g. the alive features of two seeds) found the same directions.
    Pass an untrained SAE's alive rows as ``b`` for the chance level."""
    from saelib.studies.matching import max_cosine_match

    return float(max_cosine_match(a, b)[1].median())
