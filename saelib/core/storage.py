"""Where saelib keeps things on disk, and how it writes them.

Every artefact (activation caches, subject models, trained SAEs, tables, browsers) lives under
``cache_root()`` in a folder named by a *content key*: a hash of everything that determines it, so
a rerun finds the finished result and a changed knob gets a folder of its own. Every write is
atomic: a file or folder is written under a temporary name unique to the process and renamed into
place, so a run killed at any moment leaves the previous complete version or the new one. Files are
fsynced before the rename, so a power cut cannot publish a name whose data never reached the disk.

Every committed folder carries ``checksums.json`` (the sha256 of each file in it, subfolders
included), written by ``commit_dir``; ``verify`` checks it when the folder is loaded and raises
``DamagedError`` naming the damaged file and what to do. ``locked`` serialises the writers of one
folder across processes (fcntl), so two runs into one place wait for each other instead of racing.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from saelib.core import seeding

__all__ = ["cache_root", "content_key", "tensor_digest", "artifact_dir", "atomic_dir", "commit_dir",
           "sweep_stale", "atomic_save", "atomic_json", "atomic_text", "DamagedError", "write_checksums", "verify",
           "read_json", "locked", "memoized_call", "CHECKSUMS"]

_LIBC = ctypes.CDLL(None, use_errno=True)
CHECKSUMS = "checksums.json"
"""The per-folder list of file digests (activation caches already use ``manifest.json`` for their spec)."""
_STAMP = ".verified"
"""Beside checksums.json: the size and mtime of each file when it last verified, so large memmaps are
hashed once rather than at every load. Any write to a file changes its mtime and voids the stamp."""


class DamagedError(ValueError):
    """A file of a saved artefact is missing, truncated or altered since it was written."""


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


def _identity(value: Any) -> Any:
    """What a cache key records of an argument: tensors and modules by their contents (a module also
    by its type, ``cfg`` and repr, which holds what ``extra_repr`` adds), functions by their
    qualified names, containers item by item."""
    if isinstance(value, Tensor):
        return {"tensor": tensor_digest(value), "dtype": str(value.dtype)}
    if isinstance(value, torch.nn.Module):
        state = value.state_dict()
        return {"module": type(value).__qualname__, "cfg": str(getattr(value, "cfg", None)),
                "repr": repr(value), "state": tensor_digest(*(state[k] for k in sorted(state))),
                "names": sorted(state)}
    if isinstance(value, functools.partial):
        return {"partial": _identity(value.func), "args": _identity(value.args),
                "kwargs": _identity(value.keywords)}
    if callable(value) and hasattr(value, "__qualname__"):
        if "<locals>" in value.__qualname__ or value.__qualname__ == "<lambda>":
            raise TypeError(f"cannot key {value.__qualname__}: a local function or lambda has no stable name; "
                            "pass a module-level function")
        return {"function": f"{value.__module__}.{value.__qualname__}"}
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot key an argument of type {type(value).__name__}; pass tensors, modules, "
                    "functions, numbers, strings or containers of them")


def memoized_call(kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, stored on the first call under ``artifact_dir(kind, key)`` and read
    back (checksums verified) on the next: for a chapter's slow, deterministic analyses, so a
    rerun skips them. The key holds ``fn``'s name and every argument by content (``_identity``:
    a tensor or model that changed by a bit gets a folder of its own); the result must survive
    ``torch.save`` (tensors, frames, dataclasses of them). Unlike the trained artefacts' keys, this
    one does not see ``fn``'s code: after changing what ``fn`` computes, delete ``$SAELIB_CACHE/<kind>``."""
    key = {"call": _identity(fn), "args": _identity(list(args)), "kwargs": _identity(kwargs)}
    folder = artifact_dir(kind, key)
    path = folder / "result.pt"
    if not path.exists():
        with locked(folder):  # two builds sharing the cache compute it once
            if not path.exists():
                result = fn(*args, **kwargs)
                tmp = atomic_dir(folder)
                torch.save(result, tmp / "result.pt")
                (tmp / "key.json").write_text(json.dumps(key, indent=1))
                commit_dir(tmp, folder)
                return result
    verify(folder, f"delete {folder} and rerun to compute it again")
    return torch.load(path, weights_only=False)


def artifact_dir(kind: str, key: Any) -> Path:
    """A cache folder for an expensive artefact (e.g. trained SAEs), named by a content key.

    ``key`` must hold everything that determines the artefact (configs, data identity), so a rerun
    with the same key finds the finished result and a changed knob gets a folder of its own."""
    return cache_root() / kind / content_key({**key, "random_streams": seeding.VERSION})


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(final: Path) -> list[Path]:
    """Remove the half-written siblings of ``final`` (``.NAME.tmpPID``, ``.NAME.oldPID``) that
    processes killed mid-write left behind; those of a running process are kept. Returns what was
    removed."""
    removed = []
    for kind in ("tmp", "old"):
        for sibling in final.parent.glob(f".{final.name}.{kind}*"):
            pid = sibling.name[len(f".{final.name}.{kind}"):]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final``; pass it to ``commit_dir`` when fully written. Stale
    siblings of killed writers are swept first."""
    sweep_stale(final)
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Record the checksums of a folder written by ``atomic_dir`` and move it into place (replacing an
    older ``final``)."""
    write_checksums(tmp)
    if final.exists():
        if _exchange(tmp, final):  # one atomic step: there is always a complete ``final``
            shutil.rmtree(tmp)
        else:  # no renameat2 (not Linux, or a filesystem without it): a moment without ``final``
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_file(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_file(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    _atomic_file(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def atomic_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_file(Path(path), lambda tmp: tmp.write_text(text))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (CHECKSUMS, _STAMP))


def write_checksums(folder: Path) -> None:
    """Write ``folder/checksums.json``: {relative path: [size, sha256]} of every file under it, each
    fsynced first (what is recorded is what is on the disk). ``commit_dir`` calls it."""
    folder = Path(folder)
    sums = {}
    for f in _files(folder):
        _fsync(f)
        sums[f.relative_to(folder).as_posix()] = [f.stat().st_size, _sha256(f)]
    (folder / _STAMP).unlink(missing_ok=True)
    atomic_json(sums, folder / CHECKSUMS)


def _stat_stamp(folder: Path, names: list[str]) -> dict[str, list[int]]:
    return {n: [(folder / n).stat().st_size, (folder / n).stat().st_mtime_ns] for n in names}


def verify(folder: Path, advice: str | None = None, stamp: bool = False) -> None:
    """Check every file of ``folder`` against its ``checksums.json``; raise ``DamagedError`` naming
    the first missing, resized or altered file and ``advice`` (default: delete the folder and rerun).

    With ``stamp`` (for large caches), a folder that verified is stamped with its files' sizes and
    mtimes and not hashed again until one of them changes. Folders written before checksums existed
    (no checksums.json) are accepted as they are: there is nothing to check them against."""
    folder = Path(folder)
    advice = advice or f"delete {folder} and rerun to rebuild it"
    sums_path = folder / CHECKSUMS
    if not sums_path.exists():
        return
    sums = read_json(sums_path, advice)
    stamp_path = folder / _STAMP
    if stamp and stamp_path.exists():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(stamp_path.read_text()) == _stat_stamp(folder, sorted(sums)):
                return
    for name, (size, digest) in sorted(sums.items()):
        path = folder / name
        if not path.is_file():
            raise DamagedError(f"{path} is damaged: the file is missing; {advice}")
        if path.stat().st_size != size:
            raise DamagedError(f"{path} is damaged: {path.stat().st_size} bytes where {size} were written "
                               f"(truncated or overwritten); {advice}")
        if _sha256(path) != digest:
            raise DamagedError(f"{path} is damaged: its contents differ from what was written (checksum "
                               f"mismatch); {advice}")
    if stamp:
        with contextlib.suppress(OSError):  # a read-only cache is still verified, just not stamped
            atomic_json(_stat_stamp(folder, sorted(sums)), stamp_path)


def read_json(path: Path, advice: str) -> Any:
    """``json.loads`` of a file, a missing, truncated or invalid one raising ``DamagedError`` with ``advice``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedError(f"{path} is damaged: the file is missing; {advice}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedError(f"{path} is damaged: not valid JSON ({e}); {advice}") from None


@contextlib.contextmanager
def locked(folder: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.NAME.lock`` file beside it) while writing it.

    A second process asking for the same lock prints which process holds it and waits
    (``wait=True``) or raises ``BlockingIOError``. The lock file lives beside the folder so the
    folder itself can be replaced while locked; the kernel releases the lock when its holder exits,
    killed or not, and the holder removes the file when done (a waiter that finds its file removed
    or replaced tries again, so two processes never both hold the lock)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(f".{folder.name}.lock")
    told = False
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            if not wait:
                f.close()
                raise BlockingIOError(f"{folder} is being written by process {holder}; wait for it to finish "
                                      "or write elsewhere") from None
            if not told:
                print(f"waiting for process {holder}, which is writing {folder}", file=sys.stderr, flush=True)
                told = True
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # the holder removed this file as we waited on it: lock the new one
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        f.close()  # releases the flock
