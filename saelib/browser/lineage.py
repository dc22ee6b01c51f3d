"""Feature browser, part 4: a final feature's history across a model's training checkpoints.

Chapter 4 trains one SAE per checkpoint and matches every feature of the final SAE to a feature of
each earlier one (by decoder direction; the matching is the caller's, ``saelib.studies.matching``).
A lineage page shows, for one final feature, its matched ancestor at every checkpoint: the
ancestor's index, its cosine with the final direction, its density on that checkpoint's held-out
tokens and its top-activating contexts, so a reader sees when the feature appeared and whether it
read the same text then. ``LineageView`` shows one in a notebook; ``write_lineage`` writes a static
site (an index of final features and one page per feature), offline like the browser.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from torch import Tensor

from saelib.browser.gather import FeatureData
from saelib.browser.pages import FeatureView, _css
from saelib.core.storage import atomic_dir, commit_dir

__all__ = ["Lineage", "LineageView", "write_lineage"]


@dataclass
class Lineage:
    """Every final feature's ancestor at each checkpoint, with what the ancestor reads there."""

    steps: list[int]
    """Training steps of the checkpoints, in order (the last is the final SAE's)."""
    ancestor: Tensor
    """[checkpoints, final features] index of the matched feature (-1: none)."""
    cosine: Tensor
    """[checkpoints, final features] its decoder cosine with the final feature (NaN: none)."""
    data: Mapping[int, FeatureData]
    """Each checkpoint's gathered features (``gather_features`` on its held-out table)."""
    born: Tensor | None = None
    """[final features] birth step (NaN: not born), shown on the index and the pages."""

    def __post_init__(self) -> None:
        shape = (len(self.steps), self.ancestor.shape[1])
        if tuple(self.ancestor.shape) != shape or tuple(self.cosine.shape) != shape:
            raise ValueError(f"ancestor and cosine must be [checkpoints={shape[0]}, features]; got "
                             f"{tuple(self.ancestor.shape)} and {tuple(self.cosine.shape)}")
        missing = [s for s in self.steps if s not in self.data]
        if missing:
            raise ValueError(f"no gathered features for checkpoints {missing}")

    def row(self, c: int, feature: int) -> dict:
        """What checkpoint ``c`` holds of final feature ``feature``: step, ancestor, cosine, density."""
        a = int(self.ancestor[c, feature])
        d = self.data[self.steps[c]]
        return {"step": self.steps[c], "ancestor": a, "cosine": float(self.cosine[c, feature]),
                "density": float(d.density[a]) if a >= 0 else float("nan")}


class LineageView:
    """One final feature's lineage as HTML (no JavaScript): a row per checkpoint with the ancestor's
    cosine and density and its top contexts, shaded by activation as in the browser."""

    def __init__(self, lineage: Lineage, feature: int, tokenizer, n_contexts: int = 3):
        if not 0 <= feature < lineage.ancestor.shape[1]:
            raise IndexError(f"final feature {feature} out of range ({lineage.ancestor.shape[1]} features)")
        self.lineage, self.feature, self.tokenizer, self.n_contexts = lineage, feature, tokenizer, n_contexts

    def _contexts(self, c: int) -> str:
        row = self.lineage.row(c, self.feature)
        if row["ancestor"] < 0:
            return "(no match)"
        view = FeatureView(self.lineage.data[row["step"]], row["ancestor"], self.tokenizer)
        d = view.data
        shown = [view._context(int(r), ctx) for r, ctx in zip(d.top_rows[row["ancestor"]][:self.n_contexts],
                                                             d.top_context[row["ancestor"]][:self.n_contexts])
                 if r >= 0]
        return "".join(shown) or "(never fires on the held-out tokens)"

    def _repr_html_(self) -> str:
        f, lin = self.feature, self.lineage
        born = "" if lin.born is None else f" · born at step {_step(float(lin.born[f]))}"
        rows = []
        for c in range(len(lin.steps)):
            r = lin.row(c, f)
            cos = "-" if r["ancestor"] < 0 else f"{r['cosine']:.2f}"
            dens = "-" if r["ancestor"] < 0 else f"{100 * r['density']:.3g}%"
            rows.append(f"<tr><td>{r['step']}</td><td>{r['ancestor'] if r['ancestor'] >= 0 else '-'}</td>"
                        f"<td>{cos}</td><td>{dens}</td><td>{self._contexts(c)}</td></tr>")
        return (f'<div class="saeb"><style>{_css()}</style><div class="head"><b>final feature {f}</b>{born}</div>'
                '<table class="lineage"><tr><th>step</th><th>ancestor</th><th>cosine</th><th>density</th>'
                f'<th>top contexts</th></tr>{"".join(rows)}</table></div>')


def _step(born: float) -> str:
    return "-" if born != born else f"{born:.0f}"  # NaN: not born


def write_lineage(lineage: Lineage, tokenizer, out_dir: str | os.PathLike, features: Sequence[int] | None = None,
                  title: str = "Feature lineage") -> Path:
    """A static site: ``index.html`` (the final features with their birth step and their cosine at
    every checkpoint) and ``feature_<i>.html`` per final feature (``LineageView``); written into a
    temporary folder and renamed into place. Returns the index."""
    out = Path(out_dir)
    chosen = list(range(lineage.ancestor.shape[1])) if features is None else [int(f) for f in features]
    tmp = atomic_dir(out)
    style = f"<style>{_css()}</style>"
    head = "".join(f"<th>{s}</th>" for s in lineage.steps)
    rows = []
    for f in chosen:
        cos = "".join("<td>-</td>" if lineage.ancestor[c, f] < 0 else f"<td>{float(lineage.cosine[c, f]):.2f}</td>"
                      for c in range(len(lineage.steps)))
        born = "" if lineage.born is None else f"<td>{_step(float(lineage.born[f]))}</td>"
        rows.append(f'<tr><td><a href="feature_{f}.html">{f}</a></td>{born}{cos}</tr>')
        page = LineageView(lineage, f, tokenizer)._repr_html_()
        (tmp / f"feature_{f}.html").write_text(
            f'<!doctype html><meta charset="utf-8"><title>{html.escape(title)}: feature {f}</title>{style}'
            f'<p><a href="index.html">all features</a></p>{page}', encoding="utf-8")
    born_head = "" if lineage.born is None else "<th>born</th>"
    (tmp / "index.html").write_text(
        f'<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>{style}'
        f'<h2>{html.escape(title)}</h2><p>Cosine of each final feature with its matched ancestor at every '
        f'checkpoint (columns: training steps).</p><table class="lineage"><tr><th>feature</th>{born_head}{head}'
        f'</tr>{"".join(rows)}</table>', encoding="utf-8")
    commit_dir(tmp, out)
    return out / "index.html"

