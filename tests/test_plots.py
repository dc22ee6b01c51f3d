"""Figures whose log axes meet values <= 0 (a random stand-in model's CE increase below zero, an
SAE with no live feature): they leave those points out and say so in the figure, never fail."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from saelib.book import plots  # noqa: E402


def _texts(fig) -> str:
    fig.canvas.draw()  # a log axis with nothing positive fails here, not at plotting time
    return "\n".join(t.get_text() for t in fig.texts)


def test_loggable_keeps_positive_rows_and_names_the_others():
    frame = pd.DataFrame({"sae": ["a", "b", "c"], "x": [0.1, -0.2, 0.3], "y": [1.0, 2.0, np.nan]})
    shown, note = plots.loggable(frame, ["x", "y"])
    assert list(shown.sae) == ["a"] and "2 of 3 points (b, c)" in note
    assert plots.loggable(frame.iloc[:1], ["x", "y"])[1] == ""


def test_frontiers_and_per_layer_say_what_their_log_axes_leave_out():
    table = pd.DataFrame({"sae": list("abcd"), "family": ["relu local"] * 2 + ["relu e2e"] * 2,
                          "CE increase": [0.1, -0.02, 0.2, 0.3], "L0": [10.0, 5.0, 8.0, 0.0]})
    text = _texts(plots.frontiers(table, ys=["L0"], x="CE increase"))
    assert "2 of 4 points (b, d)" in text
    assert "no point" in " ".join(t.get_text() for ax in plots.frontiers(table.assign(L0=0.0), ys=["L0"],
                                                                            x="CE increase").axes
                                  for t in ax.texts)
    layers = pd.DataFrame({"objective": ["local"] * 2 + ["e2e"] * 2, "layer": ["b7", "b8"] * 2,
                           "mse": [0.1, 0.0, 0.2, 0.3]})
    assert "1 of 4 points (local)" in _texts(plots.per_layer(layers, {"mse": "MSE"}, hue="objective",
                                                             log_y=["mse"]))


def test_a_narrow_frontier_panel_is_linear_and_labelled():
    # chapter 3's alive shares, 93-100%: a log axis that narrow labelled no tick at all
    table = pd.DataFrame({"family": ["relu local"] * 3, "CE increase": [0.05, 0.08, 0.14],
                          "alive": [0.999, 0.995, 0.933], "L0": [140.0, 70.0, 36.0]})
    fig = plots.frontiers(table, ys=["L0", "alive"], x="CE increase")
    fig.canvas.draw()
    wide, narrow = fig.axes
    assert wide.get_yscale() == "log" and narrow.get_yscale() == "linear"
    low, high = narrow.get_ylim()
    labels = [t.label1.get_text() for t in narrow.yaxis.get_major_ticks() if low <= t.get_loc() <= high]
    assert sum(bool(label) for label in labels) >= 2, labels


def test_ratio_trend_without_any_ratio_names_the_budgets():
    ratios = pd.DataFrame({"tokens": [1000, 2000], "median": [np.nan] * 2, "min": [np.nan] * 2,
                           "max": [np.nan] * 2, "sae": ["saelib SAE"] * 2})
    agreement = pd.DataFrame({"tokens": [1000, 2000], "objective": ["local"] * 2, "cosine": [0.3, 0.4],
                              "chance": [0.1, 0.1]})
    assert "no ratio at 2 of 2 budgets (1,000, 2,000 tokens)" in _texts(plots.ratio_trend(ratios, agreement))
