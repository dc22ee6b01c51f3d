"""Named text corpora: the offline shelf (Debian packages) and Hugging Face datasets.

Every corpus is a list of documents (plain strings, markup removed). Offline names:

=============  ===================  =====================================================
name           Debian package       documents
=============  ===================  =====================================================
kjv            bible-kjv-text       one per chapter of the King James Bible
gcide          dict-gcide           one per headword block of the GCIDE dictionary
python-docs    python3.11-doc       one per node of the Python 3.11 info manual
linux-docs     linux-doc-6.1        one per reST file of the kernel docs (no translations)
mixed          all four             the four above interleaved, balanced by characters
=============  ===================  =====================================================

``hf:<dataset>[:<config>]`` streams the text field of a Hugging Face dataset (or a local
directory of json/csv/txt files) through ``datasets.load_dataset(..., streaming=True)``.

Cleaned full corpora are cached as JSON under ``$SAELIB_CACHE/corpora`` (default
``~/.cache/saelib``), so only the first full load pays for decompression and cleaning.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from pathlib import Path
from typing import Callable, Iterator

from saelib.core.storage import atomic_text, cache_root

__all__ = ["load_corpus", "list_corpora", "iter_corpus", "CorpusUnavailable", "HELDOUT_EVERY", "split_documents"]

HELDOUT_EVERY = 20
"""Every 20th document of a corpus (5%) is held out: ``split="heldout"`` windows come only from
those, ``split="train"`` windows never do, so splice evaluation reads text no SAE was trained on
(and no organism trained with ``OrganismProfile.heldout_unseen``)."""


def split_documents(docs: list[str], split: str) -> list[str]:
    """The documents of ``split``: "heldout" (every ``HELDOUT_EVERY``-th, counted from the corpus's
    start, so any prefix of it splits alike) or "train" (the others)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout")]


class CorpusUnavailable(RuntimeError):
    """The data behind a corpus name is not installed on this machine."""


# ----------------------------------------------------------------------------- kjv

KJV_DATA = Path("/usr/lib/bible.data")
_VERSE = re.compile(r"^\s+\d+\s+")
_HEADING = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]* \d+$")


def _kjv() -> Iterator[str]:
    _require(KJV_DATA, "bible-kjv-text (and bible-kjv for the `bible` command)")
    try:
        out = subprocess.run(
            ["bible", "-p", str(KJV_DATA.parent), "Gen1:1-Rev22:21"],
            check=True, capture_output=True, text=True,
        ).stdout
    except FileNotFoundError as e:
        raise CorpusUnavailable("kjv needs the `bible` command: apt-get install -y bible-kjv") from e
    # The dump is "Book N" headings (after a blank line) followed by verses "  V text" whose
    # wrapped continuation lines start at column 0.
    chapter: list[str] = []
    prev_blank = True
    for line in out.splitlines():
        if prev_blank and _HEADING.match(line):
            if chapter:
                yield _join_chapter(chapter)
            chapter = []
        elif line.strip():
            chapter.append(line)
        prev_blank = not line.strip()
    if chapter:
        yield _join_chapter(chapter)


def _join_chapter(lines: list[str]) -> str:
    verses: list[str] = []
    for line in lines:
        if _VERSE.match(line):
            verses.append(_VERSE.sub("", line).strip())
        elif verses:  # continuation of a wrapped verse
            verses[-1] += " " + line.strip()
    return " ".join(verses)


# ----------------------------------------------------------------------------- gcide

GCIDE_DATA = Path("/usr/share/dictd/gcide.dict.dz")
_HEADWORD = re.compile(r"^[^\s\\][^\\\n]* \\[^\\\n]*\\")  # e.g. Abuse \\A*buse"\\, n.
_GCIDE_SUBS = [
    (re.compile(r"<[^>\n]{1,40}>"), ""),  # stray SGML-style tags (<p>, <hw>, ...)
    (re.compile(r"\s*\\[^\\\n]{0,60}\\"), ""),  # pronunciation between backslashes: \A*buse"\
    (re.compile(r"\[(?:\d{4} Webster|WordNet[^\]]*|PJC|[^\]\s]{1,4})\]"), ""),  # source tags, accents
    (re.compile(r"[{}]"), ""),  # cross-reference braces: {Abuse} -> Abuse
    (re.compile(r"--(?=[A-Z])"), "— "),  # quotation attributions: --Shak. -> — Shak.
    (re.compile(r"[ \t]*\n[ \t]*"), "\n"),
    (re.compile(r"[ \t]{2,}"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _gcide() -> Iterator[str]:
    _require(GCIDE_DATA, "dict-gcide")
    block: list[str] = []
    in_header = True  # the file opens with a licence header before the first headword
    prev_blank = False
    with gzip.open(GCIDE_DATA, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if in_header:
                if _HEADWORD.match(line):
                    in_header = False
                    block = [line]
                continue
            # A headword starts at column 0 after a blank line; its definition lines are indented.
            if prev_blank and _HEADWORD.match(line) and block and not _is_same_entry(block, line):
                yield _clean_gcide("".join(block))
                block = []
            block.append(line)
            prev_blank = not line.strip()
    if block:
        yield _clean_gcide("".join(block))


def _is_same_entry(block: list[str], line: str) -> bool:
    # Consecutive senses of one word (e.g. "Abuse ..., v. t." then "Abuse ..., n.") form one document.
    return block[0].split(" \\", 1)[0].lower() == line.split(" \\", 1)[0].lower()


def _clean_gcide(text: str) -> str:
    for pat, rep in _GCIDE_SUBS:
        text = pat.sub(rep, text)
    return text.strip()


# ----------------------------------------------------------------------------- python-docs

PYTHON_INFO = Path("/usr/share/info/python3.11.info.gz")
_INFO_SUBS = [
    (re.compile(r"\*[Nn]ote\s+([^:]+?):\s*[0-9a-f]+\b\.?"), r"\1"),  # *note configparser: 21. -> configparser
    (re.compile(r"\*[Nn]ote\s+([^:]+?)::"), r"\1"),
    (re.compile(r"^\* Menu:\s*$", re.M), ""),
    (re.compile(r"^\* [^\n]*$", re.M), ""),  # menu entries (bullets in the text are indented)
    (re.compile(r"^[*=.\-]{3,}\s*$", re.M), ""),  # heading underlines
    (re.compile(r"[\x00-\x08\x0b-\x1f\x7f]"), ""),  # info control characters (\x1f node marks, \x08 ...)
    (re.compile(r"\(\d+\)"), ""),  # footnote markers like bpo-45173(1)
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _python_docs() -> Iterator[str]:
    _require(PYTHON_INFO, "python3.11-doc")
    with gzip.open(PYTHON_INFO, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    # Nodes are separated by \x1f; each node starts with a "File: ..., Node: ..." line.
    for node in text.split("\x1f"):
        body = node.split("\n", 2)
        if len(body) < 3 or not body[1].startswith("File:"):
            continue
        cleaned = body[2]
        for pat, rep in _INFO_SUBS:
            cleaned = pat.sub(rep, cleaned)
        cleaned = cleaned.strip()
        if len(cleaned) > 200:  # tag tables and index stubs are short noise
            yield cleaned


# ----------------------------------------------------------------------------- linux-docs

LINUX_DOCS = Path("/usr/share/doc/linux-doc-6.1/Documentation")
_RST_SUBS = [
    (re.compile(r"^\.\. SPDX-License-Identifier:.*$", re.M), ""),
    (re.compile(r"^\.\. _[^:]+:\s*$", re.M), ""),  # link targets
    (re.compile(r"^\.\. [a-z-]+::.*(?:\n[ \t]+:[^\n]*)*$", re.M), ""),  # directives + their options
    (re.compile(r"^\.\.(?: [^\n]*)?$", re.M), ""),  # comments
    (re.compile(r"^([=\-~^\"'`#*+]{3,})\s*$", re.M), ""),  # heading over/underlines
    (re.compile(r":[a-z:]+:`([^`<]*?)\s*<[^>]*>`"), r"\1"),  # :ref:`text <target>` -> text
    (re.compile(r":[a-z:]+:`([^`]*)`"), r"\1"),  # :c:func:`foo` -> foo
    (re.compile(r"`([^`<]+?)\s*<[^>]+>`_+"), r"\1"),  # `text <url>`_ -> text
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`]+)`_*"), r"\1"),
    (re.compile(r"\|([\w-]+)\|"), r"\1"),  # substitutions
    (re.compile(r"[\x00-\x08\x0b-\x1f\x7f]"), ""),  # form feeds and other control characters
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _linux_docs() -> Iterator[str]:
    _require(LINUX_DOCS, "linux-doc-6.1")
    files = sorted(
        p for p in LINUX_DOCS.rglob("*")
        if p.is_file() and (p.name.endswith(".rst") or p.name.endswith(".rst.gz") or p.name.endswith(".txt.gz")
                            or p.name.endswith(".txt"))
        and "translations" not in p.relative_to(LINUX_DOCS).parts
    )
    for p in files:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        for pat, rep in _RST_SUBS:
            text = pat.sub(rep, text)
        text = text.strip()
        if len(text) > 200:
            yield text


# ----------------------------------------------------------------------------- registry

_SHELF: dict[str, Callable[[], Iterator[str]]] = {
    "kjv": _kjv,
    "gcide": _gcide,
    "python-docs": _python_docs,
    "linux-docs": _linux_docs,
}
_PACKAGES = {"kjv": "bible-kjv bible-kjv-text", "gcide": "dict-gcide", "python-docs": "python3.11-doc",
             "linux-docs": "linux-doc-6.1"}


def list_corpora() -> list[str]:
    """Offline corpus names (``hf:<dataset>[:<config>]`` names are accepted as well)."""
    return [*_SHELF, "mixed"]


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise CorpusUnavailable(f"{path} is missing; install the Debian package with "
                                f"`apt-get install -y {package}` (as root)")


def iter_corpus(name: str, *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents of a corpus, lazily (no cache). See ``load_corpus`` for the names."""
    if name.startswith("hf:"):
        return _hf(name[3:], text_field=text_field, split=split)
    if name == "mixed":
        return _interleave([_SHELF[n]() for n in _SHELF])
    if name not in _SHELF:
        raise ValueError(f"unknown corpus {name!r}; valid names: {list_corpora()} "
                         "or 'hf:<dataset>[:<config>]' for a Hugging Face dataset")
    return _SHELF[name]()


def _interleave(sources: list[Iterator[str]]) -> Iterator[str]:
    """Merge sources so that every prefix holds about equal characters from each live source."""
    # Always draw from the source that has contributed the fewest characters so far (ties by
    # order), so a prefix of `mixed` is balanced by text volume, not by document count.
    emitted = [0] * len(sources)
    live = list(range(len(sources)))
    while live:
        i = min(live, key=lambda j: (emitted[j], j))
        try:
            doc = next(sources[i])
        except StopIteration:
            live.remove(i)
            continue
        emitted[i] += len(doc)
        yield doc


def _hf(spec: str, *, text_field: str, split: str) -> Iterator[str]:
    import datasets

    # A local directory may contain ':' only in odd cases; split the config off the right.
    path, config = spec, None
    if ":" in spec and not Path(spec).exists():
        path, config = spec.rsplit(":", 1)
    ds = datasets.load_dataset(path, config, split=split, streaming=True)
    for row in ds:
        if text_field not in row:
            raise KeyError(f"dataset {path!r} has no field {text_field!r}; its fields are {sorted(row)}; "
                           "pass text_field=...")
        if row[text_field]:
            yield row[text_field]


def load_corpus(name: str, max_chars: int | None = None, *, text_field: str = "text",
                split: str = "train", use_cache: bool = True) -> list[str]:
    """Load a corpus as a list of cleaned documents.

    ``name`` is one of ``list_corpora()`` or ``hf:<dataset>[:<config>]``. With ``max_chars`` the
    documents stop once that many characters are collected (the last one is cut), and only as much
    raw data is read as needed. A full offline load is cached as JSON (see ``saelib.core.storage.cache_root``)."""
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}")
    cache = cache_root() / "corpora" / f"{name}.json"
    cacheable = use_cache and not name.startswith("hf:")
    if cacheable and cache.exists():
        return _truncate(json.loads(cache.read_text()), max_chars)
    if name == "mixed" and cacheable and max_chars is None:
        docs = list(_interleave([iter(load_corpus(n)) for n in _SHELF]))  # reuses the per-corpus caches
    else:
        docs = _truncate(iter_corpus(name, text_field=text_field, split=split), max_chars)
    if cacheable and (max_chars is None or sum(map(len, docs)) < max_chars):  # all of it: cache it too
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(json.dumps(docs), cache)  # a killed run never leaves a half-written cache
    return docs


def _truncate(docs, max_chars: int | None) -> list[str]:
    out: list[str] = []
    total = 0
    for d in docs:
        if max_chars is not None and total + len(d) >= max_chars:
            out.append(d[: max_chars - total])
            break
        out.append(d)
        total += len(d)
    return out
