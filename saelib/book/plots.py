"""Figures shared by the chapters: one colour per SAE variant, curves over training, distributions.

Each function takes data a notebook computed and returns a matplotlib Figure; nothing is read from
disk here, so a figure always shows the run that produced it. Seaborn draws what it is made for
(lines per SAE from long tables, histograms, heatmaps), with the palette of ``color``; the book's
look (``style``) stays matplotlib's rcParams, set here and nowhere else.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FormatStrFormatter, FuncFormatter, NullFormatter

from saelib.core.allocation import RULES

# Colours of names that are not plain rules (a rule's own colour is in its registry entry).
NAMED_COLORS = {"topk+aux_k": "#17becf", "feature_choice_matched": "#ff9896", "mutual_choice+aux_zipf": "#98df8a",
                "organism": "#9467bd", "untrained": "#c7c7c7",
                # chapter 3: objectives (Braun et al.) by rule
                "relu local": "#7f7f7f", "relu e2e": "#ff7f0e", "relu e2e+ds": "#8c564b",
                "topk local": "#1f77b4", "topk e2e": "#d62728", "local": "#7f7f7f", "e2e": "#ff7f0e",
                "e2e+ds": "#8c564b", "official local": "#bcbd22", "official e2e": "#e377c2",
                "saelib SAE": "#1f77b4", "official SAE": "#e377c2"}
METRIC_LABELS = {"nmse": "NMSE (fraction of variance unexplained)", "l0": "L0 (active features per token)",
                 "dead_frac": "fraction of dead features",
                 "underused_frac": "fraction under half their Zipf target", "loss": "training loss",
                 "aux": "auxiliary loss", "recovered": "true directions recovered (cos > 0.9)",
                 "heldout_nmse": "held-out NMSE"}


def style() -> None:
    """The book's matplotlib defaults (readable in the HTML at its column width)."""
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
                         "legend.frameon": False, "font.size": 10})


def color(name: str) -> str:
    """A stable colour per SAE name: by exact name, then by the longest name or registered rule it
    starts with."""
    known = {**{rule: RULES[rule].color for rule in RULES}, **NAMED_COLORS}
    if name in known:
        return known[name]
    for prefix, c in sorted(known.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix):
            return c
    return f"C{abs(hash(name)) % 10}"


def palette(names: Sequence[str]) -> dict[str, str]:
    """``color`` for each name, as the ``palette`` seaborn takes with ``hue``."""
    return {name: color(name) for name in names}


def training_curves(history: pd.DataFrame, metrics: Sequence[str] = ("nmse", "l0", "dead_frac"),
                    log_y: Sequence[str] = ("nmse",)) -> Figure:
    """One panel per metric against tokens seen, one line per SAE (a trainer history frame)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    names = list(history["sae"].unique())
    for i, (ax, metric) in enumerate(zip(axes[0], metrics)):
        sns.lineplot(data=history, x="tokens", y=metric, hue="sae", hue_order=names, palette=palette(names),
                     estimator=None, errorbar=None, lw=1.5, legend=i == 0, ax=ax)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 600k, not overlapping 600000 labels
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        if metric in log_y:
            ax.set_yscale("log")
            plain_log_labels(ax.yaxis)
    sns.move_legend(axes[0][0], "best", fontsize=8, title=None)
    fig.tight_layout()
    return fig


def count_histograms(counts: Mapping[str, np.ndarray], xlabel: str = "active features per token",
                     reference: tuple[str, np.ndarray] | None = None) -> Figure:
    """Distributions of small integer counts (e.g. per-token L0), one step histogram per SAE;
    ``reference`` (label, counts) is drawn filled in grey behind them (e.g. the ground truth)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    everything = [np.asarray(c) for c in counts.values()] + ([np.asarray(reference[1])] if reference else [])
    top = int(max(np.percentile(c, 99.5) for c in everything)) + 2
    if reference:
        sns.histplot(x=np.asarray(reference[1]), discrete=True, stat="density", color="0.85", alpha=1,
                     linewidth=0, label=reference[0], ax=ax)
    for name, c in counts.items():
        sns.histplot(x=np.asarray(c), discrete=True, stat="density", element="step", fill=False, lw=1.8,
                     color=color(name), label=name, ax=ax)
    ax.set_xlim(-0.5, top + 0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def allocation_picture(masks: Mapping[str, np.ndarray]) -> Figure:
    """Which (token, feature) entries each rule keeps from the same pre-activations: one panel per
    rule with kept entries coloured, and the number kept per token beside it."""
    fig, axes = plt.subplots(1, len(masks) + 1, figsize=(3.2 * (len(masks) + 1), 3.6),
                             gridspec_kw={"width_ratios": [3] * len(masks) + [2]})
    for ax, (name, mask) in zip(axes, masks.items()):
        mask = np.asarray(mask)
        sns.heatmap(mask, cmap=ListedColormap(["white", color(name)]), vmin=0, vmax=1, cbar=False,
                    xticklabels=False, yticklabels=False, ax=ax)
        for spine in ax.spines.values():  # heatmap drops the frame; white cells would merge with the page
            spine.set(visible=True, color="0.7", lw=0.8)
        ax.set_title(f"{name}: {int(mask.sum())} kept", fontsize=9)
        ax.set_xlabel("feature")
        ax.grid(False)
    axes[0].set_ylabel("token")
    counts = axes[-1]
    for name, mask in masks.items():
        per_token = np.asarray(mask).sum(1)
        counts.plot(per_token, np.arange(len(per_token)), "o-", ms=2.5, lw=1, color=color(name), label=name)
    counts.invert_yaxis()
    counts.set_xlabel("kept per token")
    counts.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sorted_densities(densities: Mapping[str, np.ndarray], fits: Mapping[str, tuple[float, float]] | None = None,
                     target: np.ndarray | None = None) -> Figure:
    """Feature densities sorted from most to least frequent on log-log axes, one line per SAE;
    ``fits`` maps a name to (exponent s, log10 C) of a Zipf line C * rank ** -s drawn dashed;
    ``target`` (density per rank) is drawn in black."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, density in densities.items():
        d = np.sort(np.asarray(density))[::-1]
        ranks = np.arange(1, len(d) + 1)
        ax.loglog(ranks[d > 0], d[d > 0], color=color(name), lw=1.6, label=name)
        if fits and name in fits:
            s, log_c = fits[name]
            ax.loglog(ranks, 10**log_c * ranks**-s, "--", color=color(name), lw=1, label=f"Zipf fit, s = {s:.2f}")
    if target is not None:
        ax.loglog(np.arange(1, len(target) + 1), target, "k:", lw=1.2, label="Feature Choice target")
    ax.set_xlabel("feature rank (by density)")
    ax.set_ylabel("density (fraction of tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _label_2_3_5(value: float, _pos: int) -> str:
    leading = value / 10 ** np.floor(np.log10(value))
    return f"{value:g}" if round(leading) in (2, 3, 5) else ""


def plain_log_labels(axis) -> None:
    """Label a log axis with plain numbers (0.2, not 2x10^-1), minor ticks at 2, 3 and 5 only, so
    labels never overlap on axes spanning less than a decade or two."""
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(FuncFormatter(_label_2_3_5))


def loggable(frame: pd.DataFrame, columns: Sequence[str], label: str = "sae") -> tuple[pd.DataFrame, str]:
    """The rows of ``frame`` a log axis can show (every one of ``columns`` finite and > 0) and a
    sentence naming what is left out (empty when nothing is): a CE increase below zero or an L0 of 0
    is a result, and a log axis must not silently drop it."""
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    keep = (np.isfinite(values) & (values > 0)).all(axis=1)
    if keep.all():
        return frame, ""
    dropped = frame[~keep]
    names = ", ".join(str(n) for n in (dropped[label] if label in dropped else dropped.index)[:6])
    more = f" and {len(dropped) - 6} more" if len(dropped) > 6 else ""
    return frame[keep], (f"not shown on the log scale ({' or '.join(columns)} <= 0 or undefined): "
                         f"{len(dropped)} of {len(frame)} points ({names}{more})")


def _note(fig: Figure, notes: Sequence[str]) -> None:
    """Print ``notes`` under a figure's panels (what its log axes leave out)."""
    notes = list(dict.fromkeys(n for n in notes if n))
    if notes:
        fig.tight_layout(rect=(0, 0.06 * len(notes), 1, 1))
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, ha="left", va="bottom", wrap=True)


def frontiers(table: pd.DataFrame, ys: Sequence[str], x: str = "L0", family: str = "family") -> Figure:
    """One panel per metric in ``ys`` against ``x`` (log-log), a line through each family's points;
    points a log axis cannot show (values <= 0) are left out and counted under the panels. A metric
    that spans less than a factor of 3 (an alive share of 93-100%, say) gets a linear axis: a log
    one that narrow would carry no labelled tick."""
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 3.8), squeeze=False)
    names = list(table[family].unique())
    notes = []
    for i, (ax, y) in enumerate(zip(axes[0], ys)):
        shown, note = loggable(table, [x, y])
        notes.append(note and f"{y} panel: {note}")
        if shown.empty:
            ax.text(0.5, 0.5, "no point to show on log axes", transform=ax.transAxes, ha="center", fontsize=9)
        else:
            sns.lineplot(data=shown, x=x, y=y, hue=family, hue_order=names, palette=palette(names), marker="o",
                         markersize=6, markeredgewidth=0, estimator=None, errorbar=None, sort=True,
                         legend=i == 0, ax=ax)
        ax.set_xscale("log")
        plain_log_labels(ax.xaxis)
        if shown.empty or shown[y].max() >= 3 * shown[y].min():
            ax.set_yscale("log")
            plain_log_labels(ax.yaxis)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    if axes[0][0].get_legend() is not None:  # none when the first panel has no point to show
        sns.move_legend(axes[0][0], "best", fontsize=8, title=None)
    fig.tight_layout()
    _note(fig, notes)
    return fig


def per_layer(frame: pd.DataFrame, ys: Mapping[str, str], x: str = "layer", hue: str = "sae",
              log_y: Sequence[str] = ()) -> Figure:
    """One panel per column in ``ys`` (column -> axis label) against the later layers ``x`` (in the
    frame's order), one line per ``hue``: e.g. downstream reconstruction error per layer. On the
    ``log_y`` panels, values <= 0 are left out and counted under the panels."""
    fig, axes = plt.subplots(1, len(ys), figsize=(4.6 * len(ys), 3.4), squeeze=False)
    names = list(frame[hue].unique())
    notes = []
    for i, (ax, (y, label)) in enumerate(zip(axes[0], ys.items())):
        shown, note = loggable(frame, [y], label=hue) if y in log_y else (frame, "")
        notes.append(note and f"{label}: {note}")
        # the layers keep the whole frame's order when some of their points are left out
        shown = shown.assign(**{x: pd.Categorical(shown[x], categories=list(dict.fromkeys(frame[x])))})
        if shown.empty:
            ax.text(0.5, 0.5, "no value to show on a log axis", transform=ax.transAxes, ha="center", fontsize=9)
        else:
            sns.lineplot(data=shown, x=x, y=y, hue=hue, hue_order=names, palette=palette(names), marker="o",
                         estimator=None, errorbar=None, sort=False, legend=i == 0, ax=ax)
        if y in log_y:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=15)
    if axes[0][0].get_legend() is not None:  # none when the first panel has no point to show
        sns.move_legend(axes[0][0], "best", fontsize=8, title=None)
    fig.tight_layout()
    _note(fig, notes)
    return fig


def histogram_panels(panels: Mapping[str, Mapping[str, np.ndarray]], xlabel: str, bins: int = 50,
                     binrange: tuple[float, float] | None = None) -> Figure:
    """One panel per title, one step histogram (density) per named series in it: e.g. max-cosine
    similarities within an SAE, across seeds and across objectives."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.3), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            sns.histplot(np.asarray(values), bins=bins, binrange=binrange, stat="density", element="step",
                         fill=False, color=color(name), label=name, ax=ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def table(frame: pd.DataFrame, formats: Mapping[str, str] | None = None, digits: int = 3):
    """A DataFrame as the book shows it: a blank where a value does not apply (NaN: the k of a ReLU
    SAE, the L1 coefficient of a TopK one), ``formats`` per column (e.g. ``{"k": "{:.0f}"}``), other
    numbers to ``digits`` decimals with thousands separated. Returns a pandas Styler."""
    # An index name would add a second header row; the first column speaks for itself (the levels
    # of a MultiIndex keep their names: several columns do not).
    if frame.index.nlevels == 1:
        frame = frame.rename_axis(index=None)
    return frame.style.format(formats or {}, precision=digits, na_rep="",
                                                      thousands=",")


# ----------------------------------------------------------------------------- training dynamics

def step_axis(ax, steps: Sequence[int] | None = None) -> None:
    """Training step on a symlog x-axis (linear below 1, so step 0 has a place), with the SAE
    checkpoints ``steps`` marked by faint vertical lines."""
    ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    ax.set_xlim(left=-0.3)  # symlog's margins would otherwise open a negative decade
    ax.set_xlabel("training step of the model")
    for s in steps or ():
        ax.axvline(s, color="0.6", lw=0.6, ls=":", zorder=0)


def over_steps(frame: pd.DataFrame, metrics: Mapping[str, str], hue: str = "method",
               references: Mapping[str, Mapping[str, float]] | None = None, ncols: int = 3) -> Figure:
    """One panel per metric (``metrics``: column -> axis label) against ``frame.step``, one line
    per value of ``hue``; ``references[metric]`` maps a label to a horizontal line (e.g. chance)."""
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows), squeeze=False)
    names = list(frame[hue].unique())
    for i, (ax, (metric, label)) in enumerate(zip(axes.flat, metrics.items())):
        for j, name in enumerate(names):
            part = frame[frame[hue] == name]
            ax.plot(part.step, part[metric], "o-", ms=3.5, lw=1.4, color=f"C{j}", label=name)
        for k, (ref, value) in enumerate((references or {}).get(metric, {}).items()):
            ax.axhline(value, color="0.3", lw=1, ls=("--", ":", "-.")[k % 3], label=ref)
        step_axis(ax)
        ax.set_ylabel(label)
        if i == 0 or metric in (references or {}):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def births(born: Mapping[str, np.ndarray], steps: Sequence[int], sorted_by: Mapping[str, np.ndarray]) -> Figure:
    """Left: how many features are born at each SAE checkpoint, one bar group per kind in ``born``
    (e.g. token-level and context-level features). Right: every feature's birth step, sorted, one
    line per entry of ``sorted_by`` (e.g. independent and tracked SAEs)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    pos = np.arange(len(steps))
    width = 0.8 / max(1, len(born))
    for j, (name, b) in enumerate(born.items()):
        b = np.asarray(b)
        counts = [(b == s).sum() / max(1, len(b)) for s in steps]
        left.bar(pos + (j - (len(born) - 1) / 2) * width, counts, width, color=f"C{j + 2}",
                 label=f"{name} ({len(b)})")
    left.set_xticks(pos, [str(s) for s in steps], rotation=45)
    left.set_xlabel("birth: model step from which a feature stays matched")
    left.set_ylabel("fraction of the kind's features")
    left.legend(fontsize=8)
    for j, (name, b) in enumerate(sorted_by.items()):
        b = np.sort(np.asarray(b, dtype=float)[np.isfinite(b)])
        right.plot(np.arange(len(b)) / max(1, len(b) - 1), b, lw=1.8, color=f"C{j}", label=name)
    right.set_yscale("symlog", linthresh=1, linscale=0.5)
    right.set_xlabel("features, sorted by birth (fraction)")
    right.set_ylabel("birth step")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def threshold_curves(frame: pd.DataFrame, ylabel: str) -> Figure:
    """One line per column of ``frame`` against its index, the decoder-cosine threshold of a
    matching (ceiling and floor columns, named so, dashed and dotted): how a verdict moves with it."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for j, col in enumerate(frame.columns):
        style = "--" if col.startswith("ceiling") else ":" if col.startswith("floor") else "-"
        ax.plot(frame.index, frame[col], style, marker="o", ms=3.5, lw=1.5,
                color="0.3" if style != "-" else f"C{j}", label=col)
    ax.set_xlabel("decoder-cosine threshold of a match")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def trajectories(coords: np.ndarray, steps: Sequence[int], labels: Sequence[str]) -> Figure:
    """Paths of features through a 2-D projection of their decoder directions: ``coords`` is
    [checkpoints, features, 2]; each path starts at a hollow circle (first checkpoint) and ends at
    a filled one (last), with the first and last steps written beside it."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for j, label in enumerate(labels):
        path = coords[:, j]
        ax.plot(path[:, 0], path[:, 1], "-", lw=1.2, color=f"C{j}", alpha=0.8)
        ax.scatter(path[:, 0], path[:, 1], s=14, color=f"C{j}", zorder=3)
        ax.scatter(*path[0], s=60, facecolors="none", edgecolors=f"C{j}", zorder=4)
        ax.scatter(*path[-1], s=60, color=f"C{j}", zorder=4, label=label)
        for i in (0, len(path) - 1):
            ax.annotate(f"{steps[i]}", path[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1 of the decoder directions")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- vision (chapter 5)

GROUP_COLORS = {"high": "#1f77b4", "high-to-low": "#d62728", "low-to-high": "#2ca02c", "other": "0.8"}
LATENT_KIND_COLORS = {"class top-k": "#d62728", "dataset top-k": "#1f77b4", "random k": "#7f7f7f"}


def _show_image(ax, image: np.ndarray, patch_map: np.ndarray | None = None, vmax: float | None = None,
                title: str | None = None) -> None:
    """A grey image with, optionally, a latent's patch activations drawn over it in red (patches
    where it is silent stay clear)."""
    ax.imshow(np.asarray(image), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    if patch_map is not None:
        pm = np.asarray(patch_map, dtype=float)
        size = np.asarray(image).shape[0]
        up = np.kron(pm, np.ones((size // pm.shape[0], size // pm.shape[1])))
        top = vmax if vmax else max(float(pm.max()), 1e-9)
        ax.imshow(np.ma.masked_where(up <= 0, up), cmap="Reds", vmin=0, vmax=top, alpha=0.6,
                  interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set(visible=True, color="0.8", lw=0.6)
    if title:
        ax.set_title(title, fontsize=7)


def image_grid(rows: Mapping[str, tuple[np.ndarray, Sequence[str]]], per_row: int = 10) -> Figure:
    """Example images: one row per entry ``name -> (images [n, H, W], titles)``."""
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 0.95, len(rows) * 1.15),
                             squeeze=False)
    for r, (name, (images, titles)) in enumerate(rows.items()):
        for c in range(per_row):
            ax = axes[r][c]
            if c < len(images):
                _show_image(ax, images[c], title=titles[c])
            else:
                ax.set_visible(False)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return fig


def patch_highlights(rows: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[str]]]) -> Figure:
    """Reference images of latents with the patches where each fires highlighted: one row per
    latent, ``(row label, images [n, H, W], patch maps [n, g, g], image titles)``; the colour scale
    is per row (the latent's largest activation among its images)."""
    n = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.05, len(rows) * 1.2), squeeze=False)
    for r, (label, images, maps, titles) in enumerate(rows):
        vmax = float(np.max(maps)) if np.size(maps) else None
        for c in range(n):
            ax = axes[r][c]
            if c < len(images):
                _show_image(ax, images[c], maps[c], vmax=vmax, title=titles[c])
            else:
                ax.set_visible(False)
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def frequency_activation(frequency: np.ndarray, mean_activation: np.ndarray, entropy: np.ndarray,
                         marked: Mapping[int, tuple[np.ndarray, np.ndarray]], max_entropy: float) -> Figure:
    """PatchSAE's Figure 3 (as its official code draws it): each live latent at (log10 frequency,
    log10 mean activation), both per image on the token mean, coloured by label entropy; the
    latents in ``marked`` (latent -> (reference images, patch maps)) are circled and numbered,
    with their three reference images on the right."""
    fig = plt.figure(figsize=(11, 4.6))
    grid = fig.add_gridspec(len(marked), 4, width_ratios=[3.2, 0.55, 0.55, 0.55], wspace=0.08)
    ax = fig.add_subplot(grid[:, 0])
    live = (np.asarray(frequency) > 0) & np.isfinite(entropy)
    frame = pd.DataFrame({"log10 frequency": np.log10(frequency[live]),
                          "log10 mean activation": np.log10(np.maximum(mean_activation[live], 1e-12)),
                          "label entropy": entropy[live]})
    points = ax.scatter(frame["log10 frequency"], frame["log10 mean activation"], c=frame["label entropy"],
                        cmap="viridis", vmin=0, vmax=max_entropy, s=9, alpha=0.8, linewidths=0)
    fig.colorbar(points, ax=ax, label="label entropy (nats)", pad=0.01)
    ax.set_xlabel("log10 frequency (fraction of images)")
    ax.set_ylabel("log10 mean activation (token mean)")
    for j, (latent, (images, maps)) in enumerate(marked.items()):
        x, y = np.log10(frequency[latent]), np.log10(max(mean_activation[latent], 1e-12))
        ax.scatter([x], [y], s=80, facecolors="none", edgecolors="k", lw=1.2)
        ax.annotate(f"{j + 1}", (x, y), xytext=(5, 5), textcoords="offset points", fontsize=9,
                    weight="bold")
        vmax = float(np.max(maps)) if np.size(maps) else None
        for c in range(3):
            sub = fig.add_subplot(grid[j, 1 + c])
            if c < len(images):
                _show_image(sub, images[c], maps[c], vmax=vmax)
            else:
                sub.set_visible(False)
            if c == 0:
                sub.set_ylabel(f"{j + 1}: latent {latent}", fontsize=7)
    return fig


def masking_curves(frame: pd.DataFrame, references: Mapping[str, float], n_latents: int) -> Figure:
    """PatchSAE's Figure 5: accuracy against k with only the top-k latents on (left) or off
    (right), for class-level and dataset-level rankings and random latents; ``references``
    (label -> accuracy) drawn as horizontal lines (the model alone, with the full SAE spliced in)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, mode in zip(axes, ("on", "off")):
        part = frame[frame["mode"] == mode]
        for name, sub in part.groupby("latents", sort=False):
            ax.plot(sub.k, 100 * sub.accuracy, "o-", ms=3.5, lw=1.5, label=name,
                    color=LATENT_KIND_COLORS.get(name))
        for j, (label, acc) in enumerate(references.items()):
            ax.axhline(100 * acc, color="0.3", lw=1, ls=("--", ":", "-.")[j % 3], label=label)
        ax.set_xscale("log")
        plain_log_labels(ax.xaxis)
        ax.set_xlim(0.8, n_latents * 1.25)
        ax.set_xlabel("k (latents per image)")
        ax.set_title(f"only the top-k latents {mode}" if mode == "on" else "top-k latents off",
                     fontsize=10)
    axes[0].set_ylabel("accuracy with the SAE spliced in (%)")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def class_scatter(frames: Mapping[str, pd.DataFrame]) -> Figure:
    """PatchSAE's Figure 6: class-level counts of (latent, class) pairs under the base model (x)
    and the adapted one (y), one panel per task, coloured by group (``frame`` columns: base count,
    adapted count, group); counts on log(1 + count) axes."""
    fig, axes = plt.subplots(1, len(frames), figsize=(5 * len(frames), 4.2), squeeze=False)
    order = ["other", "high", "high-to-low", "low-to-high"]
    for i, (ax, (task, frame)) in enumerate(zip(axes[0], frames.items())):
        data = frame.assign(base=np.log1p(frame["base count"]), adapted=np.log1p(frame["adapted count"]))
        sns.scatterplot(data=data, x="base", y="adapted", hue="group", palette=GROUP_COLORS,
                        hue_order=[g for g in order if g in set(data.group)], s=12, linewidth=0,
                        alpha=0.8, legend=i == 0, ax=ax)
        top = float(max(data.base.max(), data.adapted.max())) * 1.05
        ax.plot([0, top], [0, top], color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("base model: log(1 + class-level count)")
        ax.set_ylabel("adapted model: log(1 + class-level count)")
        ax.set_title(task, fontsize=10)
    sns.move_legend(axes[0][0], "upper left", fontsize=7, title=None)
    fig.tight_layout()
    return fig


def count_heatmaps(panels: Mapping[str, pd.DataFrame]) -> Figure:
    """Class-level counts as heatmaps, one panel per entry (rows latents, columns classes),
    each row scaled to its maximum so single-class and multi-class latents read alike."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4), squeeze=False)
    for ax, (title, frame) in zip(axes[0], panels.items()):
        scaled = frame.div(frame.max(axis=1).replace(0, 1), axis=0)
        sns.heatmap(scaled, cmap="mako_r", vmin=0, vmax=1, cbar=False, ax=ax, linewidths=0.3,
                    linecolor="white")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("latent")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(False)
# ----------------------------------------------------------------------------- scale studies

def over_tokens(frame: pd.DataFrame, metrics: Mapping[str, str], hue: str = "sae",
                reference: float | None = None) -> Figure:
    """One panel per metric (``metrics``: column -> axis label) against ``frame.tokens`` on a log
    axis, one line per value of ``hue`` in the rules' colours; ``reference``: a horizontal line
    (e.g. 1 for a ratio to a baseline)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.2), squeeze=False)
    for i, (ax, (metric, label)) in enumerate(zip(axes[0], metrics.items())):
        for name, part in frame.groupby(hue, sort=False):
            ax.plot(part.tokens, part[metric], "o-", ms=4, lw=1.5, color=color(name), label=name)
        if reference is not None:
            ax.axhline(reference, color="0.3", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(sorted(frame.tokens.unique()))  # the budgets, not crowded minor ticks
        ax.xaxis.set_major_formatter(EngFormatter(sep="", places=1))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ratio_trend(ratios: pd.DataFrame, agreement: pd.DataFrame, reference: float = 2.0) -> Figure:
    """Chapter 3's trend figure. Left: a ratio read along two frontiers (``ratios``: tokens, median,
    min, max, one line per ``sae``), the median as a line and its range over the shared x range as a
    band, with a dashed line at 1 and a dotted one at ``reference`` (the paper's claim). Right:
    cross-seed agreement (``agreement``: tokens, objective, cosine, chance), one line per objective,
    each beside its chance level (dashed, the same colour). Budgets with no ratio (the frontiers
    share no x range there) are named under the panels."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    missing = []
    for name, part in ratios.groupby("sae", sort=False):
        c = color(name)
        gone = part[~np.isfinite(part["median"].astype(float))]
        if len(gone):
            missing.append(f"{name}: no ratio at {len(gone)} of {len(part)} budgets "
                           f"({', '.join(f'{t:,.0f}' for t in gone.tokens)} tokens): the frontiers share no range")
        part = part[np.isfinite(part["median"].astype(float))]
        if part.empty:
            continue
        left.fill_between(part.tokens, part["min"], part["max"], color=c, alpha=0.15, lw=0)
        left.plot(part.tokens, part["median"], "o-", ms=4, lw=1.5, color=c, label=name)
    left.axhline(1, color="0.3", lw=1, ls="--")
    left.axhline(reference, color="0.3", lw=1, ls=":", label=f"the paper: > {reference:g}x")
    left.set_ylabel("L0 local / L0 e2e at equal CE increase")
    for name, part in agreement.groupby("objective", sort=False):
        right.plot(part.tokens, part.cosine, "o-", ms=4, lw=1.5, color=color(name), label=name)
        right.plot(part.tokens, part.chance, "--", lw=1, color=color(name))
    right.set_ylabel("median cross-seed max cosine\n(dashed: untrained, alive features)")
    budgets = sorted(ratios.tokens.unique())
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlim(budgets[0] / 1.3, budgets[-1] * 1.3)  # the budgets, also where no ratio is drawn
        ax.set_xticks(budgets)
        ax.xaxis.set_major_formatter(EngFormatter(sep="", places=0))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training tokens per SAE")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _note(fig, missing)
    return fig
