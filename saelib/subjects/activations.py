"""Activation harvesting and the on-disk activation cache.

Reading activations from a subject model is the slow part of SAE work on a CPU (SmolLM2's first
half runs at a few thousand tokens/s), so they are harvested once into a cache directory and every
SAE is then trained from it:

* ``manifest.json``: the ``CacheSpec`` fields, d_in, n_rows, storage dtype, versions, timing;
* ``activations.bin``: a raw [n_rows, d_in] array in the storage dtype (bfloat16 as uint16 bits),
  opened as a read-only ``np.memmap`` so only the rows a batch needs are read;
* ``tokens.npy``: int32 [n_windows, context_size], the token windows that were run.

Row ``r`` is token ``first_position + r % rows_per_window`` of window ``r // rows_per_window``
(``ActivationCache.locate``), so any row can be shown in its context.

``ActivationCache`` is an activation table for ``saelib.core.training.train_saes`` and
``saelib.core.metrics.evaluate``: ``len(cache)`` rows, ``cache[idx]`` float32 rows. The trainer shuffles
by index (and sorts each batch, so memmap reads stay mostly sequential), which is why no streaming
shuffle buffer is needed here: the cache is the data path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from saelib.core import seeding
from saelib.core.devices import to_device_of
from saelib.core.hooks import check_hook_point, stop_layer
from saelib.core.progress import bar as progress_bar
from saelib.core.sae import PRECISIONS
from saelib.core.storage import (DamagedError, atomic_dir, cache_root, content_key, locked, read_json, verify,
                                 write_checksums)
from saelib.subjects.corpora import HELDOUT_EVERY, load_corpus, split_documents
from saelib.subjects.language_models import load_subject_model

__all__ = [
    "CacheSpec", "ActivationCache", "CacheMismatchError", "NonFiniteActivationError", "harvest",
    "token_windows", "get_or_build_cache", "build_caches", "open_cache", "HELDOUT_EVERY", "RowSubset",
    "WindowTable", "drop_norm_outliers", "at_precision",
]


_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


class CacheMismatchError(ValueError):
    """A cache directory holds activations for a different ``CacheSpec`` than the one requested."""


class NonFiniteActivationError(FloatingPointError):
    """The subject model produced NaN or inf activations (or they overflow the storage dtype)."""


@dataclass(frozen=True)
class CacheSpec:
    """What to harvest. Every field is part of the cache key, so changing any makes a new cache."""

    model: str
    """Subject model name as given to ``load_subject_model`` (e.g. 'smollm2-135m', 'organism-cpu')."""
    hook: str
    """TransformerLens hook point, e.g. 'blocks.15.hook_resid_post'."""
    corpus: str = "mixed"
    """``saelib.subjects.corpora`` corpus name the windows are cut from."""
    n_tokens: int = 200_000
    """Activation rows to store (after BOS exclusion)."""
    context_size: int = 128
    """Tokens per window, BOS included; at most the model's n_ctx."""
    batch_size: int = 16
    """Windows per forward pass (affects speed only, up to float rounding)."""
    dtype: str = "float16"
    """Storage dtype: float16 (half the disk of float32, ~3 significant digits), bfloat16 (float32's
    range, for models whose activations exceed 65504) or float32."""
    exclude_bos: bool = True
    """Drop position 0 (BOS), whose activations are outliers (in SmolLM2's residual stream about 140x
    the median token's norm at layer 15, 9x at layer 5) that would dominate an SAE's loss."""
    checkpoint: int | None = None
    """Organism training step (None: the final weights)."""
    seed: int = 0
    """Seed of the window order."""
    split: str = "train"
    """Documents to cut windows from: "train", or "heldout" for evaluating SAEs (see token_windows)."""
    model_dtype: str = "float32"
    """Precision of the model's forward pass while harvesting: float32, or bfloat16 (2.7x as fast for
    SmolLM2 on this book's CPU, which has AVX-512 BF16; rows differ from float32's by about 1.2%
    (median) at layer 15, except the few massive-activation rows, which differ more; see
    bench/bench_harvest.py). Part of the key, so caches of the two precisions never mix."""

    def __post_init__(self) -> None:
        if self.dtype not in _STORAGE:
            raise ValueError(f"CacheSpec.dtype must be one of {list(_STORAGE)}, got {self.dtype!r}")
        if self.model_dtype not in PRECISIONS:
            raise ValueError(f"CacheSpec.model_dtype must be one of {list(PRECISIONS)}, got {self.model_dtype!r}")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"CacheSpec.split must be 'train' or 'heldout', got {self.split!r}")
        if self.n_tokens <= 0 or self.batch_size <= 0 or self.context_size < 2:
            raise ValueError(f"CacheSpec needs n_tokens > 0, batch_size > 0 and context_size >= 2: {self}")

    def key(self) -> str:
        """Short stable hash of the spec: the cache's directory name."""
        fields_ = asdict(self)
        fields_["random_streams"] = seeding.VERSION  # the window order depends on it
        return content_key(fields_, 16, algorithm="sha256")

    @property
    def rows_per_window(self) -> int:
        return self.context_size - int(self.exclude_bos)

    @property
    def n_windows(self) -> int:
        return math.ceil(self.n_tokens / self.rows_per_window)


# ============================================================================ windows

def token_windows(tokenizer, corpus: str, n_windows: int, context_size: int, seed: int = 0,
                  split: str = "train") -> Tensor:
    """[n_windows, context_size] token ids: the corpus's documents joined by EOS, cut into windows
    that each start with BOS (as TransformerLens's ``to_tokens`` would), in a seeded random order.
    For SmolLM2 that is its tokenizer's BOS ``<|im_start|>`` with ``<|im_end|>`` between documents;
    for the organisms ``<|endoftext|>`` is both, as in their training.

    ``split`` picks the documents (see ``HELDOUT_EVERY``). The held-out documents are held out from
    SAE training; from an organism's training only where its profile says ``heldout_unseen`` (the
    chapter-4 organisms), so only there is its loss on them a generalisation measure. Only as much text as needed is read."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise ValueError("the tokenizer has no bos_token_id; set tokenizer.bos_token before cutting windows")
    body = context_size - 1
    need = n_windows * body
    # ~4 characters per token; the held-out split sees only 1 document in HELDOUT_EVERY.
    chars = int(need * 4.5 * (HELDOUT_EVERY if split == "heldout" else 1.1)) + 20_000
    while True:
        docs = load_corpus(corpus, max_chars=chars)
        complete = sum(map(len, docs)) < chars  # the corpus ran out before the budget
        keep = split_documents(docs, split)
        if complete:  # the whole split is here: refuse before tokenizing what cannot be enough
            at_most = sum(len(d.encode()) for d in keep) + len(keep)  # a token spans >= 1 byte, + one EOS each
            if at_most < need:
                raise ValueError(f"corpus {corpus!r} ({split} split) holds at most {at_most:,} tokens "
                                 f"({at_most // body:,} windows of {context_size}), {n_windows:,} windows requested; "
                                 "ask for fewer tokens or use a larger corpus")
        ids: list[int] = []
        for enc in tokenizer(keep, add_special_tokens=False)["input_ids"] if keep else []:
            ids.extend(enc)
            ids.append(eos)
        if len(ids) >= need or complete:
            break
        chars = int(chars * 1.5 * need / max(len(ids), 1))
    n = len(ids) // body
    if n < n_windows:
        raise ValueError(f"corpus {corpus!r} ({split} split) holds only {n} windows of {context_size} tokens, "
                         f"{n_windows} requested; ask for fewer tokens or use a larger corpus")
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    order = torch.randperm(n, generator=seeding.generator("token_windows", seed))[:n_windows]
    return torch.cat([torch.full((n_windows, 1), bos), windows[order]], dim=1)


# ============================================================================ harvesting

def _iter_harvest(model, hooks: Sequence[str], windows: Tensor, batch_size: int, exclude_bos: bool,
                  progress: bool) -> Iterator[dict[str, Tensor]]:
    """Per batch of windows: {hook: float32 [batch * rows_per_window, d]}, positions flattened."""
    if windows.ndim != 2:
        raise ValueError(f"windows must be a [n_windows, context_size] LongTensor, got shape {tuple(windows.shape)}")
    if windows.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"windows have {windows.shape[1]} tokens but the model's context is {model.cfg.n_ctx}; "
                         "use a smaller context_size")
    stop = stop_layer(model, hooks)  # also validates the hook names
    first = int(exclude_bos)
    with torch.no_grad():
        for lo in progress_bar(range(0, len(windows), batch_size), show=progress, desc="harvesting", unit="batch"):
            batch = to_device_of(windows[lo:lo + batch_size], model)
            _, cache = model.run_with_cache(batch, names_filter=list(hooks), stop_at_layer=stop)
            out = {}
            for h in hooks:
                act = cache[h][:, first:].float()
                act = act.reshape(-1, act.shape[-1]).cpu()
                bad = ~torch.isfinite(act)
                if bad.any():
                    row = int(bad.any(1).nonzero()[0]) // (batch.shape[1] - first)
                    raise NonFiniteActivationError(
                        f"{h}: {int(bad.sum())} NaN/inf activation values in windows {lo}..{lo + len(batch) - 1} "
                        f"(first in window {lo + row}). The model's weights or inputs are broken: reload the "
                        "model, or check that the token ids are within its vocabulary.")
                out[h] = act
            yield out


def harvest(model, hooks: list[str], windows: Tensor, batch_size: int = 16, exclude_bos: bool = True,
            progress: bool = True) -> dict[str, Tensor]:
    """Run ``windows`` through ``model`` and return {hook: float32 [n_windows * rows_per_window, d]}.

    The forward pass stops after the deepest requested layer (``stop_at_layer``), which is what
    makes early-layer harvests cheap. ``exclude_bos`` drops position 0: BOS activations have
    outlier norms (about 140x the median in SmolLM2's layer-15 residual) and carry no information
    about the text. Raises ``NonFiniteActivationError`` on NaN/inf and ValueError (listing the valid names)
    on an unknown hook."""
    chunks: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for out in _iter_harvest(model, hooks, windows, batch_size, exclude_bos, progress):
        for h, act in out.items():
            chunks[h].append(act)
    return {h: torch.cat(c) for h, c in chunks.items()}


# ============================================================================ cache

class ActivationCache:
    """A harvested cache directory, opened read-only. An activation table: ``len``, ``[idx]``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"{self.path} is not an activation cache (no manifest.json); build one "
                                    "with saelib.subjects.activations.get_or_build_cache(spec)")
        # Hashing a large cache takes seconds: it is verified once, then stamped (storage.verify).
        advice = f"delete {self.path} and rerun to harvest it again"
        verify(self.path, advice, stamp=True)
        self.manifest: dict = read_json(manifest, advice)
        m = self.manifest
        self.spec = CacheSpec(**{f.name: m.get(f.name, f.default) for f in fields(CacheSpec)})
        n, d = m["n_rows"], m["d_in"]
        storage = np.dtype(_STORAGE[m["dtype"]])
        data = self.path / "activations.bin"
        if not data.exists() or data.stat().st_size != n * d * storage.itemsize:
            raise DamagedError(f"{data} is damaged: missing or the wrong size for [{n}, {d}] "
                                          f"{m['dtype']}; {advice}")
        self._data = np.memmap(data, dtype=storage, mode="r", shape=(n, d))
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return self.manifest["n_rows"]

    @property
    def d_in(self) -> int:
        return self.manifest["d_in"]

    def __repr__(self) -> str:
        s = self.spec
        return (f"ActivationCache({s.model} {s.hook}: {len(self):,} rows x {self.d_in} {s.dtype}, "
                f"corpus {s.corpus!r}, at {self.path})")

    def __getitem__(self, idx: Tensor | slice | int | np.ndarray) -> Tensor:
        """float32 rows: [n, d_in] for a LongTensor/array/slice of rows, [d_in] for an int."""
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        rows = np.array(self._data[idx])  # a copy: memmap views are read-only
        if self.spec.dtype == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(rows).float()

    @property
    def tokens(self) -> np.ndarray:
        """int32 [n_windows, context_size]: the harvested windows."""
        if self._tokens is None:
            self._tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        return self._tokens

    def locate(self, rows: Tensor | np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(window, position) of each row in ``tokens``."""
        rows = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows)
        per, first = self.manifest["rows_per_window"], self.manifest["first_position"]
        return rows // per, first + rows % per

    def token_ids(self, rows: Tensor | np.ndarray | int) -> np.ndarray:
        """Token id at each row."""
        w, p = self.locate(rows)
        return np.asarray(self.tokens[w, p])

    def context(self, row: int, tokenizer, before: int = 10, after: int = 3, mark: str = "«»") -> str:
        """The row's token inside its window's text, e.g. ``'in the begin«ning» of'`` (newlines as ↵).

        Context never crosses the window (windows are shuffled, neighbours are unrelated text)."""
        w, p = (int(v) for v in self.locate(row))
        ids = self.tokens[w]
        lo, hi = max(1, p - before), min(len(ids), p + after + 1)  # position 0 is BOS, not text

        def text(a: int, b: int) -> str:
            return "".join(tokenizer.decode([int(t)]) for t in ids[a:b]).replace("\n", "↵")

        return f"{text(lo, p)}{mark[0]}{text(p, p + 1)}{mark[-1]}{text(p + 1, hi)}"


@dataclass
class RowSubset:
    """Some rows of an activation table, usable as a table of their own (``len``, ``[idx]``)."""

    table: ActivationCache
    rows: np.ndarray
    """Ascending indices into ``table`` of the rows kept (``table.context(rows[i], ...)`` for text)."""
    threshold: float
    """Norm above which rows were dropped."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: Tensor | slice | np.ndarray) -> Tensor:
        return self.table[self.rows[idx.cpu().numpy() if isinstance(idx, Tensor) else idx]]

    @property
    def tokens(self) -> np.ndarray:
        """The cache's token windows (see ``locate``)."""
        return self.table.tokens

    def locate(self, rows: Tensor | np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(window, position) in ``tokens`` of each of these rows, so the feature browser can show them."""
        return self.table.locate(self.rows[np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows)])


class WindowTable:
    """Activations read by whole windows: ``len`` windows, ``table[idx]`` float32
    [len(idx), context_size, d_in] with BOS at position 0. The table the e2e objectives train on
    (``saelib.core.objectives``): they run the model on from the SAE's layer, which needs every position
    of a window; the SAE itself reads positions 1.. (``tokens_per_row`` each).

    From a cache harvested with ``CacheSpec(exclude_bos=False)``, or from a [windows, ctx, d] tensor
    already in memory (e.g. ``model.run_with_cache(tokens)[1][hook]``).

    ``hook``: where the windows were harvested (a cache's own spec says it; pass it for a tensor).
    The trainer refuses an e2e objective that splices into another hook."""

    def __init__(self, source: ActivationCache | Tensor, hook: str | None = None):
        if isinstance(source, Tensor):
            if source.ndim != 3:
                raise ValueError(f"expected activations [windows, ctx, d_in], got shape {list(source.shape)}")
            self.cache, self._acts, self.context_size = None, source.float(), source.shape[1]
            self.hook = hook
        else:
            if source.spec.exclude_bos:
                raise ValueError(f"{source!r} stores token rows without BOS; a WindowTable needs whole "
                                 "windows: harvest with CacheSpec(exclude_bos=False)")
            if hook is not None and hook != source.spec.hook:
                raise ValueError(f"{source!r} was harvested at {source.spec.hook!r}, not {hook!r}")
            self.cache, self._acts, self.context_size = source, None, source.spec.context_size
            self.hook = source.spec.hook
        self.tokens_per_row = self.context_size - 1

    def __len__(self) -> int:
        return len(self._acts) if self._acts is not None else len(self.cache) // self.context_size

    def __getitem__(self, idx: Tensor | slice | np.ndarray) -> Tensor:
        if self._acts is not None:
            return self._acts[idx]
        windows = np.arange(len(self))[idx.cpu().numpy() if isinstance(idx, Tensor) else idx]
        rows = (windows[:, None] * self.context_size + np.arange(self.context_size)).reshape(-1)
        return self.cache[rows].reshape(len(windows), self.context_size, -1)


def drop_norm_outliers(table: ActivationCache, max_ratio: float = 10.0, threshold: float | None = None,
                       batch_size: int = 65_536) -> RowSubset:
    """``table`` without its rows of norm above ``threshold`` (default ``max_ratio`` x the median norm).

    Besides BOS, a few tokens near the start of a window carry *massive activations* (Sun et al. 2024):
    in SmolLM2's layer-15 residual about 3% of position-1 tokens reach 5-150x the median norm. Kept,
    a handful of them hold most of the variance of a batch, so NMSE would measure little else.
    Pass the training table's ``threshold`` when filtering its held-out table."""
    norms = np.concatenate([table[slice(lo, lo + batch_size)].norm(dim=1).numpy()
                            for lo in range(0, len(table), batch_size)])
    if threshold is None:
        threshold = float(max_ratio * np.median(norms))
    return RowSubset(table, np.nonzero(norms <= threshold)[0], threshold)


def _spec_diff(have: CacheSpec, want: CacheSpec) -> list[str]:
    return [f"{f.name}: cache has {getattr(have, f.name)!r}, requested {getattr(want, f.name)!r}"
            for f in fields(CacheSpec) if getattr(have, f.name) != getattr(want, f.name)]


def open_cache(path: str | os.PathLike, expect: CacheSpec | None = None) -> ActivationCache:
    """Open a cache directory; with ``expect``, raise ``CacheMismatchError`` unless it was built for it."""
    cache = ActivationCache(path)
    if expect is not None and cache.spec != expect:
        raise CacheMismatchError(
            f"{cache.path} holds activations for a different spec:\n  " + "\n  ".join(_spec_diff(cache.spec, expect))
            + "\nPass another directory (or leave path unset to use one per spec under the cache root), "
              f"or delete {cache.path} to rebuild it for the requested spec.")
    return cache


def get_or_build_cache(spec: CacheSpec, root: str | os.PathLike | None = None, model=None,
                       progress: bool = True, *, path: str | os.PathLike | None = None) -> ActivationCache:
    """The cache for ``spec``: opened if already built, harvested otherwise.

    It lives in ``path`` if given, else in ``root/<spec.key()>`` (``root`` defaults to
    ``$SAELIB_CACHE/activations``). ``model`` (which must be the one ``spec.model`` names) avoids
    reloading a model already in memory."""
    return build_caches([spec], root, model, progress, paths=None if path is None else [path])[0]


def build_caches(specs: Sequence[CacheSpec], root: str | os.PathLike | None = None, model=None,
                 progress: bool = True, *, paths: Sequence[str | os.PathLike] | None = None
                 ) -> list[ActivationCache]:
    """Like ``get_or_build_cache`` for several hooks of one model, harvested in a single pass.

    The specs may differ only in ``hook`` and ``dtype`` (the windows and forward passes are shared)."""
    root = Path(root) if root is not None else cache_root() / "activations"
    dirs = [Path(p) for p in paths] if paths is not None else [root / s.key() for s in specs]
    if len(dirs) != len(specs):
        raise ValueError(f"{len(specs)} specs but {len(dirs)} paths")
    todo = [(s, d) for s, d in zip(specs, dirs) if not (d / "manifest.json").exists()]
    if todo:
        shared = {f.name for f in fields(CacheSpec)} - {"hook", "dtype"}
        base = todo[0][0]
        for s, _ in todo[1:]:
            diff = [x for x in _spec_diff(base, s) if x.split(":")[0] in shared]
            if diff:
                raise ValueError("build_caches harvests one model on one set of windows; these specs differ in "
                                 f"{diff}: build them with separate calls")
        with contextlib.ExitStack() as held:
            for d in sorted({d for _, d in todo}):  # one order for every process: no deadlock
                held.enter_context(locked(d))
            # A process that held the locks before us may have harvested some of them meanwhile.
            todo = [(s, d) for s, d in todo if not (d / "manifest.json").exists()]
            if todo:
                _build(todo, model, progress)
    return [open_cache(d, expect=s) for s, d in zip(specs, dirs)]


def _build(todo: list[tuple[CacheSpec, Path]], model, progress: bool) -> None:
    spec = todo[0][0]
    if model is None:
        model = load_subject_model(spec.model, checkpoint=spec.checkpoint)
    step = getattr(model, "checkpoint_step", None)
    if spec.checkpoint is not None and step is not None and step != spec.checkpoint:
        raise ValueError(f"the model passed is checkpoint {step} but the spec asks for checkpoint {spec.checkpoint}")
    hooks = [check_hook_point(model, s.hook) for s, _ in todo]
    if spec.context_size > model.cfg.n_ctx:
        raise ValueError(f"CacheSpec.context_size={spec.context_size} exceeds the model's context "
                         f"{model.cfg.n_ctx}; use context_size <= {model.cfg.n_ctx}")
    windows = token_windows(model.tokenizer, spec.corpus, spec.n_windows, spec.context_size, spec.seed,
                            split=spec.split)
    model = at_precision(model, spec.model_dtype)
    tmps = []
    for _, d in todo:
        tmps.append(atomic_dir(d))  # also removes the half-written folders of killed harvests
    try:
        seconds, widths = _harvest_to_disk(model, [s for s, _ in todo], tmps, windows, progress)
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for (s, d), tmp, d_in in zip(todo, tmps, widths):
        manifest = {**asdict(s), "d_in": d_in, "n_rows": spec.n_tokens, "n_windows": len(windows),
                    "rows_per_window": s.rows_per_window, "first_position": int(s.exclude_bos),
                    "key": s.key(), "model_name": model.cfg.model_name, "checkpoint_step": step,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "harvest_seconds": seconds,
                    "harvest_tokens_per_s": len(windows) * spec.context_size / seconds,
                    "hooks_in_pass": hooks, "stop_at_layer": stop_layer(model, hooks),
                    "versions": _versions()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # written last: marks completion
        write_checksums(tmp)
        try:
            os.replace(tmp, d)
        except OSError:  # another process finished the same cache first; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)


def at_precision(model, dtype: str):
    """``model`` itself if its weights are already in ``dtype`` ("float32" or "bfloat16"), else a
    copy cast to it (the caller's model is left as it is)."""
    torch_dtype = PRECISIONS[dtype]
    if next(model.parameters()).dtype == torch_dtype:
        return model
    cast = copy.deepcopy(model).to(torch_dtype, print_details=False)
    cast.cfg.dtype = torch_dtype
    return cast


def _harvest_to_disk(model, specs: list[CacheSpec], tmps: list[Path], windows: Tensor,
                     progress: bool) -> tuple[float, list[int]]:
    """Stream activations batch by batch into each tmp dir's memmap; return (seconds, widths)."""
    spec = specs[0]
    for tmp in tmps:
        np.save(tmp / "tokens.npy", windows.numpy().astype(np.int32))
    mmaps: list[np.memmap] = []
    row, t0 = 0, time.perf_counter()
    for out in _iter_harvest(model, [s.hook for s in specs], windows, spec.batch_size, spec.exclude_bos, progress):
        n = min(len(out[spec.hook]), spec.n_tokens - row)  # the last window is cut to n_tokens
        for i, s in enumerate(specs):
            act = out[s.hook][:n]
            if len(mmaps) == i:
                mmaps.append(np.memmap(tmps[i] / "activations.bin", dtype=_STORAGE[s.dtype], mode="w+",
                                       shape=(spec.n_tokens, act.shape[1])))
            mmaps[i][row:row + n] = _to_storage(act, s)
        row += n
    for mm in mmaps:
        mm.flush()
    return time.perf_counter() - t0, [mm.shape[1] for mm in mmaps]


def _to_storage(act: Tensor, spec: CacheSpec) -> np.ndarray:
    if spec.dtype == "bfloat16":
        return act.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    out = act.numpy().astype(_STORAGE[spec.dtype])
    if not np.isfinite(out).all():
        raise NonFiniteActivationError(
            f"{spec.hook}: activations up to {float(act.abs().max()):.3g} overflow {spec.dtype} "
            "(max 65504); use dtype='bfloat16' or 'float32'")
    return out


def _versions() -> dict:
    from importlib.metadata import version

    import saelib

    return {"saelib": saelib.__version__, "torch": torch.__version__,
            "transformer_lens": version("transformer-lens"), "python": platform.python_version()}
