"""Figures shared by the chapters: one colour per SAE variant, curves over training, distributions.

Each function takes data a notebook computed and returns a matplotlib Figure; nothing is read from
disk here, so a figure always shows the run that produced it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

RULE_COLORS = {"relu": "#7f7f7f", "topk": "#1f77b4", "topk+aux_k": "#17becf", "feature_choice": "#d62728",
               "mutual_choice": "#2ca02c", "mutual_choice+aux_zipf": "#98df8a", "organism": "#9467bd"}
METRIC_LABELS = {"nmse": "NMSE (fraction of variance unexplained)", "l0": "L0 (active features per token)",
                 "dead_frac": "fraction of dead features",
                 "underused_frac": "fraction under half their Zipf target", "loss": "training loss", "aux": "auxiliary loss"}


def style() -> None:
    """The book's matplotlib defaults (readable in the HTML at its column width)."""
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
                         "legend.frameon": False, "font.size": 10})


def color(name: str) -> str:
    """A stable colour per SAE name: by exact name, then by the rule it starts with."""
    if name in RULE_COLORS:
        return RULE_COLORS[name]
    for rule, c in sorted(RULE_COLORS.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(rule):
            return c
    return f"C{abs(hash(name)) % 10}"


def training_curves(history: pd.DataFrame, metrics: Sequence[str] = ("nmse", "l0", "dead_frac"),
                    log_y: Sequence[str] = ("nmse",)) -> Figure:
    """One panel per metric against tokens seen, one line per SAE (a trainer history frame)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, rows in history.groupby("sae", sort=False):
            ax.plot(rows["tokens"], rows[metric], label=name, color=color(name), lw=1.5)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        if metric in log_y:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def count_histograms(counts: Mapping[str, np.ndarray], xlabel: str = "active features per token",
                     reference: tuple[str, np.ndarray] | None = None) -> Figure:
    """Distributions of small integer counts (e.g. per-token L0), one step histogram per SAE;
    ``reference`` (label, counts) is drawn filled in grey behind them (e.g. the ground truth)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    everything = [np.asarray(c) for c in counts.values()] + ([np.asarray(reference[1])] if reference else [])
    top = int(max(np.percentile(c, 99.5) for c in everything)) + 2
    bins = np.arange(-0.5, top + 0.5)
    if reference:
        ax.hist(np.asarray(reference[1]), bins=bins, density=True, color="0.85", label=reference[0])
    for name, c in counts.items():
        ax.hist(np.asarray(c), bins=bins, density=True, histtype="step", lw=1.8, color=color(name), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
