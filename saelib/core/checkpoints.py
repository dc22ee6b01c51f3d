"""Saving and loading SAEs and training state, atomically.

A saved SAE is a folder with ``config.json`` (the SAEConfig) and ``sae.safetensors`` (parameters and
running statistics). A training checkpoint is a folder ``step_NNNNNNNN`` holding one SAE folder per
trained SAE, its Adam state, and ``state.json`` (step, configs, metric history). Every folder is
written under a temporary name and renamed into place, so a run killed at any moment leaves either
the previous complete checkpoint or the new one, never a half-written one. Each committed folder
carries the checksums of its files (``saelib.core.storage.verify``), checked when it is loaded, so
a damaged file raises ``DamagedError`` instead of being trained on or evaluated.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelib.core.sae import SAE, SAEConfig
from saelib.core.storage import DamagedError, atomic_dir, commit_dir, read_json, verify


class CheckpointError(ValueError):
    """A checkpoint was made with a different configuration (damaged files raise ``DamagedError``)."""


def _advice(folder: Path) -> str:
    return f"delete {folder} and rerun what wrote it (a training run rewrites its SAEs from its last checkpoint)"


def write_sae(sae: SAE, folder: Path) -> None:
    """Write config.json and sae.safetensors into an (already temporary) folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(sae.cfg.to_dict(), indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(folder / "sae.safetensors"))


def save_sae(sae: SAE, folder: str | Path) -> Path:
    """Save an SAE to ``folder`` atomically. Load it with ``load_sae``."""
    folder = Path(folder)
    tmp = atomic_dir(folder)
    write_sae(sae, tmp)
    commit_dir(tmp, folder)
    return folder


def read_tensors(path: Path, advice: str | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing or unreadable file raises ``DamagedError`` with ``advice``."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DamagedError(f"{path} is damaged: missing, corrupt or truncated ({e}); "
                           f"{advice or _advice(path.parent)}") from e


def load_sae(folder: str | Path, expected: SAEConfig | None = None, advice: str | None = None) -> SAE:
    """Load a saved SAE, verifying its files' checksums; if ``expected`` is given, refuse a checkpoint
    with a different config. A damaged folder raises ``DamagedError`` ending with ``advice``."""
    folder = Path(folder)
    advice = advice or _advice(folder)
    verify(folder, advice)
    try:
        cfg = SAEConfig.from_dict(read_json(folder / "config.json", advice))
    except (TypeError, ValueError) as e:
        if isinstance(e, DamagedError):
            raise
        raise DamagedError(f"{folder / 'config.json'} is damaged: not an SAE config ({e}); {advice}") from None
    if expected is not None:
        check_same_config(expected.to_dict(), cfg.to_dict(), what=f"SAE in {folder}")
    sae = SAE(cfg)
    tensors = read_tensors(folder / "sae.safetensors", advice)
    own = sae.state_dict()
    bad = [k for k in own if k not in tensors or tensors[k].shape != own[k].shape]
    if bad or set(tensors) - set(own):
        raise DamagedError(f"{folder / 'sae.safetensors'} is damaged: it does not match its config.json "
                           f"(missing or misshapen: {bad}, unexpected: {sorted(set(tensors) - set(own))}); {advice}")
    sae.load_state_dict(tensors)
    return sae


def sae_digest(sae: SAE) -> str:
    """16 hex digits of a hash over an SAE's config, parameters and statistics: equal for equal
    weights, so a cache key can name the weights an SAE was started from."""
    h = hashlib.sha1(json.dumps(sae.cfg.to_dict(), sort_keys=True).encode())
    for key, value in sorted(sae.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_config(wanted: dict, found: dict, what: str) -> None:
    """Raise CheckpointError naming every (nested) field where a checkpoint's config differs."""
    wanted, found = _flatten(wanted), _flatten(found)
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, this run has {wanted.get(k)!r}"
             for k in sorted(set(wanted) | set(found)) if wanted.get(k) != found.get(k)]
    if diffs:
        raise CheckpointError(f"{what} was made with a different configuration:\n  " + "\n  ".join(diffs)
                              + "\nUse another output folder, or delete the old checkpoints to start over.")


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    sd = opt.state_dict()
    tensors = {f"{idx}.{key}": value.cpu().contiguous() for idx, state in sd["state"].items()
               for key, value in state.items()}
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(sd["param_groups"])})


def load_optimizer(opt: torch.optim.Optimizer, path: Path, advice: str | None = None) -> None:
    from safetensors import safe_open

    tensors = read_tensors(path, advice)
    try:
        with safe_open(str(path), "pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
    except (SafetensorError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise DamagedError(f"{path} is damaged: no readable param_groups ({e}); "
                           f"{advice or _advice(path.parent)}") from None
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def step_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Every complete checkpoint of a training run, by step (oldest first). Each holds one folder
    per SAE that ``load_sae`` reads; ``TrainConfig.keep_checkpoints`` decides how many survive."""
    folder = Path(run_dir) / "checkpoints"
    done = sorted(p for p in folder.glob("step_*") if p.is_dir() and (p / "state.json").exists())
    return {int(p.name.removeprefix("step_")): p for p in done}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step_* folder under run_dir/checkpoints, or None."""
    steps = step_checkpoints(run_dir)
    return steps[max(steps)] if steps else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (the caller holds the run folder's lock)."""
    steps = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
