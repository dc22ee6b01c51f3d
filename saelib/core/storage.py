"""Where saelib keeps things on disk, and how it writes them.

Every artefact (activation caches, subject models, trained SAEs, tables, browsers) lives under
``cache_root()`` in a folder named by a *content key*: a hash of everything that determines it, so
a rerun finds the finished result and a changed knob gets a folder of its own. Every write is
atomic: a file or folder is written under a temporary name unique to the process and renamed into
place, so a run killed at any moment leaves the previous complete version or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelib.core import seeding

__all__ = ["cache_root", "content_key", "tensor_digest", "artifact_dir", "atomic_dir", "commit_dir",
           "atomic_save", "atomic_json", "atomic_text"]


def cache_root() -> Path:
    """Root of saelib's on-disk caches: ``$SAELIB_CACHE`` or ``~/.cache/saelib``."""
    return Path(os.environ.get("SAELIB_CACHE", Path.home() / ".cache" / "saelib"))


def content_key(key: Any, length: int = 16, algorithm: str = "sha1") -> str:
    """``length`` hex digits of a hash of ``key``'s JSON (sorted keys; non-JSON values by ``str``).

    ``algorithm`` is sha1 everywhere except the activation caches' sha256, kept so that caches
    written before this module existed keep their names."""
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.new(algorithm, blob).hexdigest()[:length]


def tensor_digest(*tensors: Tensor) -> str:
    """16 hex digits identifying tensors' shapes and contents (for cache keys)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def artifact_dir(kind: str, key: Any) -> Path:
    """A cache folder for an expensive artefact (e.g. trained SAEs), named by a content key.

    ``key`` must hold everything that determines the artefact (configs, data identity), so a rerun
    with the same key finds the finished result and a changed knob gets a folder of its own."""
    return cache_root() / kind / content_key({**key, "random_streams": seeding.VERSION})


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final``; pass it to ``commit_dir`` when fully written."""
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a folder written by ``atomic_dir`` into place (replacing an older ``final``)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _atomic_file(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_file(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    _atomic_file(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def atomic_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_file(Path(path), lambda tmp: tmp.write_text(text))
