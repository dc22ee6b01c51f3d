"""Feature browser, part 3: a chapter's browser, written once into the cache and published into
the book's build."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch

from saelib.browser.gather import FeatureData
from saelib.browser.lineage import Lineage, write_lineage
from saelib.browser.pages import write_browser
from saelib.core.sae import SAE
from saelib.core.storage import artifact_dir, atomic_dir, commit_dir, locked, read_json, verify

__all__ = ["BROWSER_DIR_ENV", "book_browser", "book_lineage"]

BROWSER_DIR_ENV = "SAELIB_BROWSER_DIR"
"""Where chapters publish their browsers; the book's runner points it into the build, which serves
it as ``_static/browser/<chapter>/`` (a chapter links there). Unset: ``./_browser``."""


def book_browser(chapter: str, saes: Mapping[str, SAE], model, table, key: Mapping, *, show: str | None = None,
                 **kwargs) -> tuple[Path, dict, FeatureData | None]:
    """A chapter's browser, written once and reused: ``write_browser`` into a cache folder keyed by
    ``key`` (what identifies the SAEs and the tokens, e.g. their training run) and copied to
    ``$SAELIB_BROWSER_DIR/<chapter>``. Returns the published index, the summary of the writing run
    (bytes, seconds, tokens) and the gathered data of SAE ``show`` (kept in the cache too, so a
    notebook can display one feature inline on a rerun without gathering again)."""
    cached = artifact_dir("browsers", {"chapter": chapter, **key, "kwargs": kwargs, "saes": sorted(saes),
                                       "show": show})
    with locked(cached):  # two builds on one cache: the second waits, then reads the first's browser
        if not (cached / "summary.json").exists():
            tmp = atomic_dir(cached)  # site, shown.pt and summary.json appear together, checksummed
            summary = write_browser(saes, model, table, tmp / "site", **kwargs)
            if show is not None:
                torch.save(summary.features[show], tmp / "shown.pt")
            (tmp / "summary.json").write_text(json.dumps(
                {"bytes": summary.bytes, "seconds": summary.seconds, "n_tokens": summary.n_tokens}))
            commit_dir(tmp, cached)
    advice = f"delete {cached} and rerun the chapter to write it again"
    verify(cached, advice)
    published = _published(chapter)
    staged = atomic_dir(published)
    shutil.copytree(cached / "site", staged, dirs_exist_ok=True)
    commit_dir(staged, published)
    shown = torch.load(cached / "shown.pt", weights_only=False) if (cached / "shown.pt").exists() else None
    return published / "index.html", read_json(cached / "summary.json", advice), shown


def _published(chapter: str) -> Path:
    return Path(os.environ.get(BROWSER_DIR_ENV, "_browser")) / chapter


def book_lineage(chapter: str, lineage: Lineage, tokenizer, features=None) -> Path:
    """A chapter's lineage pages (``write_lineage``), published beside its browser as
    ``$SAELIB_BROWSER_DIR/<chapter>/lineage``; written on every run (they take seconds, from data
    the chapter has gathered). Returns the index."""
    return write_lineage(lineage, tokenizer, _published(chapter) / "lineage", features,
                         title=f"{chapter}: final features across training")
