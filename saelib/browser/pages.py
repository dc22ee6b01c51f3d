"""Feature browser, part 2: the pages, from gathered ``FeatureData``.

``write_browser`` writes a static site that works from ``file://`` and inside the book (an index
page per SAE with a sortable, searchable feature table; one viewer page whose data come from small
``.js`` files, so no server and no ``fetch``); ``FeatureView`` shows one feature in a notebook,
rendered in Python without JavaScript. Token text is set with ``textContent`` in the browser and
``html.escape``-d in Python, so no token can inject markup.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from torch import Tensor

from saelib.browser.gather import FeatureData, TokenIndex, gather_features
from saelib.core.progress import bar as progress_bar
from saelib.core.sae import SAE
from saelib.core.storage import atomic_dir, commit_dir

__all__ = ["FeatureView", "BrowserSummary", "write_browser", "token_text", "shown_text", "histogram_svg"]

ASSETS = Path(__file__).with_name("assets")
"""Hooks whose activations live in the residual stream's basis, where ``W_U`` can read a direction."""
CHUNK = 256
"""Features per data file of the browser: a feature page loads one file of about 300 kB."""


# ============================================================================ token text

def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's scheme): printable Latin-1 bytes are
    themselves, the others are chr(256 + i) in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in keep)})
    return table


_BYTES = _byte_decoder()


def token_text(tokenizer, token_id: int) -> str:
    """The token's text. A byte-level fragment that is not valid UTF-8 alone (half a character)
    comes back as its bytes written ``\\xe2\\x80``, not as the replacement character."""
    text = tokenizer.decode([int(token_id)], clean_up_tokenization_spaces=False)
    if "\ufffd" in text:
        raw = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(raw, str) and raw and all(ch in _BYTES for ch in raw):
            return bytes(_BYTES[ch] for ch in raw).decode("utf-8", errors="backslashreplace")
    return text


def shown_text(text: str) -> str:
    """What a token looks like on a page: newline as ↵, tab as ⇥; control, format (e.g. bidi overrides),
    unassigned and line/paragraph separator characters as escapes such as ``\\x1b`` or ``\\u202e``
    (invisible, disruptive or not allowed in HTML otherwise); everything else unchanged."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp"):
            out.append(ascii(ch)[1:-1])  # e.g. \x1b, \u2028
        else:
            out.append(ch)
    return "".join(out)


# ============================================================================ notebook view

def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _shade(act: float, vmax: float) -> str:
    return f"rgba(255,110,0,{min(1.0, max(0.0, act / vmax)) if vmax > 0 else 0:.2f})"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


class FeatureView:
    """One feature as HTML for a notebook: histogram, logit effects, top contexts, quantile samples.

    Rendered in Python (no JavaScript), so it shows wherever notebook HTML does."""

    def __init__(self, data: FeatureData, feature: int, tokenizer):
        if not 0 <= feature < len(data.count):
            raise IndexError(f"feature {feature} out of range: {data.name} has {len(data.count)} features")
        self.data, self.feature, self.tokenizer = data, feature, tokenizer
        self._texts: dict[int, str] = {}

    def _text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = shown_text(token_text(self.tokenizer, token_id))
        return self._texts[token_id]

    def _context(self, row: int, acts: Tensor) -> str:
        d, vmax = self.data, float(self.data.max[self.feature])
        spans = []
        for off, (tid, act) in enumerate(zip(d.context_ids(row), acts.tolist())):
            if tid is None or (math.isnan(act) and off - d.before + int(d.tokens.position[row]) == 0):
                continue  # outside the window, or an unscanned BOS
            unscanned = math.isnan(act)
            cls = "tok" + (" max" if off == d.before else "") + (" u" if unscanned else "")
            title = ("not scanned" if unscanned else f"activation {_fmt(act)}") + f" · token id {tid}"
            style = f' style="background:{_shade(act, vmax)}"' if not unscanned and act > 0 else ""
            spans.append(f'<span class="{cls}" title="{_esc(title)}"{style}>{_esc(self._text(tid))}</span>')
        return f'<div class="ctx">{"".join(spans)}</div>'

    def _examples(self, rows: Tensor, values: Tensor, contexts: Tensor) -> str:
        return "".join(f'<div class="ex"><span class="val">{_fmt(float(val))}</span>{self._context(int(row), ctx)}</div>'
                       for row, val, ctx in zip(rows, values, contexts) if row >= 0)

    def _logit_table(self, title: str, ids: Tensor | None, logits: Tensor | None) -> str:
        if ids is None or logits is None:
            return ""
        cells = "".join(f'<tr><td class="tt"><span>{_esc(self._text(int(t)))}</span></td><td>{float(x):+.3f}</td></tr>'
                        for t, x in zip(ids[self.feature], logits[self.feature]))
        return f'<table class="logits"><tr><th colspan="2">{_esc(title)}</th></tr>{cells}</table>'

    def _repr_html_(self) -> str:
        d, f = self.data, self.feature
        head = (f'<div class="head"><b>{_esc(d.name)} · feature {f}</b> density {100 * float(d.density[f]):.3g}% '
                f'({int(d.count[f])} of {d.n_tokens:,} tokens) · max {_fmt(float(d.max[f]))}</div>')
        if d.count[f] == 0:
            body = f"<p>This feature did not fire on the {d.n_tokens:,} scanned tokens.</p>"
        else:
            bins = []
            for q in reversed(range(d.sample_rows.shape[1])):
                lo, hi = d.quantile_edges[f, q], d.quantile_edges[f, q + 1]
                n_q = d.sample_rows.shape[1]
                if d.sample_rows[f, q, 0] >= 0:
                    bins.append(f'<h4>quantile {100 * q // n_q}-{100 * (q + 1) // n_q}%: activations '
                                f'{_fmt(float(lo))} to {_fmt(float(hi))}</h4>'
                                + self._examples(d.sample_rows[f, q], d.sample_values[f, q], d.sample_context[f, q]))
            body = ('<h4>top activations</h4>' + self._examples(d.top_rows[f], d.top_values[f], d.top_context[f])
                    + "".join(bins))
        logits = (self._logit_table("promoted", d.promoted, d.promoted_logits)
                  + self._logit_table("suppressed", d.suppressed, d.suppressed_logits)) or _esc(d.logit_note)
        svg = histogram_svg(d.hist[f].tolist(), float(d.max[f]))
        return (f'<div class="saeb"><style>{_css()}</style>{head}<div class="row">{svg}{logits}</div>{body}</div>')


def histogram_svg(counts: list[int], vmax: float, width: int = 340, height: int = 110) -> str:
    """Bars of the activation histogram on a log count scale (the low bins hold most tokens)."""
    top = math.log1p(max(counts)) if counts and max(counts) > 0 else 1.0
    bar = (width - 10) / max(1, len(counts))
    rects = "".join(f'<rect x="{5 + i * bar:.1f}" y="{height - 20 - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}">'
                    f'<title>{c} tokens</title></rect>'
                    for i, c in enumerate(counts) if c > 0
                    for h in [(height - 34) * math.log1p(c) / top])
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{rects}'
            f'<text x="5" y="{height - 5}">0</text><text x="{width - 5}" y="{height - 5}" text-anchor="end">'
            f'{_fmt(vmax)}</text><text x="5" y="10">tokens per activation bin (log scale)</text></svg>')


def _css() -> str:
    return (ASSETS / "browser.css").read_text()


# ============================================================================ the static site

@dataclass
class BrowserSummary:
    """What ``write_browser`` wrote and what it cost."""

    index: Path
    """The top page (open it from file:// or link to it from the book)."""
    bytes: int
    seconds: float
    n_tokens: int
    features: dict[str, FeatureData] = field(repr=False)
    """The gathered data, e.g. for ``FeatureView(features[name], i, tokenizer)`` in the notebook."""


def _r(x: float) -> float | int:
    """3 significant digits: enough for shading and labels, and short in JSON."""
    return 0 if x == 0 else float(f"{x:.3g}")


def _js(key: str, value) -> str:
    # ensure_ascii: the file is plain ASCII JavaScript whatever the token text is.
    return f"SAEB.put({json.dumps(key)},{json.dumps(value, separators=(',', ':'), ensure_ascii=True)});\n"


def _page(title: str, body: str, root: str, scripts: list[str] = (), init: str = "") -> str:
    tags = "".join(f'<script src="{_esc(s)}"></script>' for s in scripts) + (f"<script>{init}</script>" if init else "")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<link rel="stylesheet" href="{root}assets/browser.css"></head>\n<body class="saeb">{body}\n{tags}'
            f'\n</body></html>\n')


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "sae"
    slug, i = base, 1
    while slug in taken:
        i += 1
        slug = f"{base}_{i}"
    taken.add(slug)
    return slug


class _SiteWriter:
    """Writes one SAE's pages and data files, and collects the windows and tokens they refer to."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.windows: set[int] = set()
        self.token_ids: set[int] = set()

    def example(self, d: FeatureData, row: int, value: float, ctx: np.ndarray) -> list:
        w, p = int(d.tokens.window[row]), int(d.tokens.position[row])
        self.windows.add(w)
        nonzero = [(int(off) - d.before, _r(float(ctx[off]))) for off in np.flatnonzero(np.nan_to_num(ctx))
                   if off != d.before]
        return [w, p, _r(value), [x for pair in nonzero for x in pair]]

    def feature(self, d: FeatureData, f: int, top: tuple, samples: tuple) -> dict:
        if d.count[f] == 0:
            return {"h": [], "t": [], "q": [], "p": [], "s": []}
        rows, values, ctx = top
        rec: dict = {"h": d.hist[f].tolist(), "q": [],
                     "t": [self.example(d, r, v, c) for r, v, c in zip(rows[f], values[f], ctx[f]) if r >= 0]}
        s_rows, s_values, s_ctx = samples
        n_q = s_rows.shape[1]
        for q in reversed(range(n_q)):
            ex = [self.example(d, r, v, c) for r, v, c in zip(s_rows[f, q], s_values[f, q], s_ctx[f, q]) if r >= 0]
            if ex:
                edges = d.quantile_edges[f]
                rec["q"].append([f"{100 * q // n_q}-{100 * (q + 1) // n_q}%", _r(float(edges[q])),
                                 _r(float(edges[q + 1])), ex])
        for key, ids, logits in (("p", d.promoted, d.promoted_logits), ("s", d.suppressed, d.suppressed_logits)):
            if ids is not None and logits is not None:
                rec[key] = [[int(t), _r(float(x))] for t, x in zip(ids[f], logits[f])]
                self.token_ids.update(rec[key][i][0] for i in range(len(rec[key])))
            else:
                rec[key] = []
        return rec

    def write(self, d: FeatureData, root: str) -> dict:
        """Write the SAE's folder; return its line of the top page."""
        data = self.folder / "data"
        data.mkdir(parents=True)
        top = (d.top_rows.numpy(), d.top_values.numpy(), d.top_context.numpy())
        samples = (d.sample_rows.numpy(), d.sample_values.numpy(), d.sample_context.numpy())
        n_features = len(d.count)
        for lo in range(0, n_features, CHUNK):
            chunk = [self.feature(d, f, top, samples) for f in range(lo, min(n_features, lo + CHUNK))]
            (data / f"f{lo // CHUNK}.js").write_text(_js(f"f{lo // CHUNK}", chunk))
        first = d.top_rows[:, 0].clamp(min=0).numpy()
        top_token = np.where(d.top_rows[:, 0].numpy() >= 0, d.tokens.windows[d.tokens.window[first],
                                                                             d.tokens.position[first]], -1)
        promoted = d.promoted[:, 0].numpy() if d.promoted is not None else np.full(n_features, -1)
        self.token_ids.update(int(t) for t in top_token if t >= 0)
        meta = {"name": d.name, "n_features": n_features, "n_tokens": d.n_tokens, "chunk": CHUNK,
                "before": d.before, "after": d.after, "logit_note": d.logit_note,
                "density": [_r(x) for x in d.density.tolist()], "max": [_r(x) for x in d.max.tolist()],
                "count": d.count.tolist(), "top": top_token.tolist(), "promoted": promoted.tolist()}
        (data / "index.js").write_text(_js("index", meta))
        scripts = [f"{root}assets/browser.js", f"{root}data/tokens.js", "data/index.js"]  # SAEB first
        title = f"{d.name}: features"
        (self.folder / "index.html").write_text(_page(title, (
            f'<div class="nav"><a href="{root}index.html">\u2190 all SAEs</a></div><h1>{_esc(d.name)}</h1>'
            f'<p class="note">{n_features:,} features over {d.n_tokens:,} tokens. Click a column to sort; search '
            'by feature number, top token or promoted token.</p><input id="search" type="search" '
            'placeholder="feature number or token text"> <span id="shown" class="note"></span>'
            '<table id="features"><thead><tr><th data-key="index">feature</th><th data-key="density">density</th>'
            '<th data-key="max">max activation</th><th>top token</th><th>promotes</th></tr></thead>'
            '<tbody></tbody></table>'), root, scripts, "SAEB.indexPage();"))
        (self.folder / "feature.html").write_text(
            _page(f"{d.name}: feature", '<div id="feature"></div>', root, scripts, "SAEB.featurePage();"))
        fired = int((d.count > 0).sum())
        return {"name": d.name, "href": f"{self.folder.name}/index.html", "features": n_features, "fired": fired}


def write_browser(saes: Mapping[str, SAE], model, table, out_dir: str | Path, *, tokens: TokenIndex | None = None,
                  n_tokens: int | None = 200_000, hook: str | None = None, tokenizer=None, title: str = "SAE features",
                  progress: bool = True, **gather: int) -> BrowserSummary:
    """Write a static feature browser of ``saes`` into ``out_dir`` (replaced atomically) and return
    its index page, size and time.

    ``model`` is the subject model (a HookedTransformer: its tokenizer renders the text, its ``W_U``
    gives the logit effects; None for neither, then pass ``tokenizer``). ``table`` and ``tokens`` are
    as in ``gather_features``, which gets the remaining keyword arguments (n_top, n_quantiles, ...)."""
    t0 = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("write_browser needs a tokenizer to show text: pass a model with .tokenizer or tokenizer=")
    features = gather_features(saes, table, tokens=tokens, n_tokens=n_tokens, model=model, hook=hook,
                               progress=progress, **gather)
    out = Path(out_dir)
    tmp = atomic_dir(out)
    (tmp / "assets").mkdir()
    for asset in ("browser.js", "browser.css"):
        (tmp / "assets" / asset).write_text((ASSETS / asset).read_text())
    taken: set[str] = {"assets", "data"}
    writers, lines = [], []
    for name, d in progress_bar(features.items(), show=progress, desc="browser: writing", unit="sae"):
        writer = _SiteWriter(tmp / _slug(name, taken))
        lines.append(writer.write(d, "../"))
        writers.append(writer)
    first = next(iter(features.values()))
    _write_tokens(tmp / "data", first.tokens, first.n_tokens, writers, tokenizer)
    rows = "".join(f'<tr><td><a href="{_esc(x["href"])}">{_esc(x["name"])}</a></td><td class="num">{x["features"]:,}'
                   f'</td><td class="num">{x["fired"]:,}</td></tr>' for x in lines)
    (tmp / "index.html").write_text(_page(title, (
        f'<h1>{_esc(title)}</h1><p class="note">Each SAE\'s features over {first.n_tokens:,} tokens: density, '
        'activation histogram, top-activating contexts, samples from each activation quantile and the tokens '
        'each feature\'s decoder direction promotes and suppresses. Written by saelib.browser.</p>'
        f'<table id="saes"><tr><th>SAE</th><th>features</th><th>fired</th></tr>{rows}</table>'), ""))
    commit_dir(tmp, out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BrowserSummary(out / "index.html", size, time.perf_counter() - t0, first.n_tokens, features)


def _write_tokens(folder: Path, tokens: TokenIndex, n_rows: int, writers: list[_SiteWriter], tokenizer) -> None:
    """data/tokens.js: the windows the examples come from, their unscanned positions, and the text of
    every token shown."""
    folder.mkdir()
    used = sorted(set().union(*(w.windows for w in writers)))
    row_at = tokens.row_at(n_rows).numpy()
    windows = {w: tokens.windows[w].tolist() for w in used}
    unscanned = {w: np.flatnonzero(row_at[w] < 0).tolist() for w in used}
    ids = set().union(*(w.token_ids for w in writers), *(set(ws) for ws in windows.values()))
    vocab = {t: shown_text(token_text(tokenizer, t)) for t in sorted(ids)}
    (folder / "tokens.js").write_text(_js("tokens", {"vocab": vocab, "windows": windows,
                                                     "unscanned": {w: u for w, u in unscanned.items() if u}}))


