"""Write the feature browser of saved SAEs: ``python -m saelib browse SAE_DIR [SAE_DIR ...] --out DIR``.

SAE_DIR is a folder written by ``saelib.core.checkpoints.save_sae`` (``config.json`` + ``sae.safetensors``),
e.g. ``runs/NAME/saes/topk`` of ``python -m saelib train``. The model and hook come from the flags, or
else from that run's ``config.json`` (``data.model`` + ``data.hook``, or the manifest of ``data.cache``).
Activations come from ``--cache`` (an activation cache built for that model and hook), or are harvested
once into the standard cache (``$SAELIB_CACHE/activations``) from ``--corpus`` text. Open
``DIR/index.html`` in a browser; it needs no server and no network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from saelib.core.checkpoints import CheckpointError
from saelib.core.storage import DamagedError, read_json

EXAMPLE = "e.g. --model smollm2-135m --hook blocks.15.hook_resid_post"


class BrowseError(ValueError):
    """Bad input to the command, with what to do about it."""


def _run_data(sae_dir: Path) -> dict:
    """The ``data`` table of the `saelib train` run that saved ``sae_dir`` (run/saes/NAME), if any."""
    config = sae_dir.parent.parent / "config.json"
    try:
        data = json.loads(config.read_text()).get("data", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_sae_dir(path: Path) -> None:
    if not path.is_dir():
        raise BrowseError(f"SAE folder {path} does not exist: pass a folder written by saelib.core.checkpoints.save_sae "
                          "(config.json + sae.safetensors), e.g. runs/NAME/saes/topk")
    if not (path / "config.json").exists() or not (path / "sae.safetensors").exists():
        raise BrowseError(f"{path} is not a saved SAE (it needs config.json and sae.safetensors, as "
                          "saelib.core.checkpoints.save_sae writes them); a SAELens export is not read here")


def resolve(a: argparse.Namespace) -> dict:
    """Model, hook, corpus and cache from the flags, else from the first SAE's run config."""
    data = _run_data(Path(a.sae_dirs[0]))
    if "synthetic" in data and not (a.model and a.hook):
        raise BrowseError(f"{a.sae_dirs[0]} was trained on synthetic data, which has no text to show; pass "
                          f"--model and --hook of a real model ({EXAMPLE})")
    cache = a.cache or data.get("cache")
    manifest: dict = {}
    if cache:
        path = Path(cache) / "manifest.json"
        if not path.exists():
            raise BrowseError(f"{cache} is not an activation cache (no manifest.json); drop --cache to harvest "
                              "activations from --corpus instead")
        manifest = read_json(path, f"delete {cache} and harvest it again")
    found = {"model": a.model or data.get("model") or manifest.get("model"),
             "hook": a.hook or data.get("hook") or manifest.get("hook"),
             "corpus": a.corpus or data.get("corpus") or "mixed", "cache": cache}
    missing = [k for k in ("model", "hook") if not found[k]]
    if missing:
        raise BrowseError(f"cannot tell the {' and '.join(missing)} of {a.sae_dirs[0]} (no `saelib train` run "
                          f"config.json with data.model and data.hook above it): pass "
                          f"{' '.join('--' + k + ' ' + k.upper() for k in missing)} ({EXAMPLE})")
    if manifest and manifest.get("hook") != found["hook"]:
        raise BrowseError(f"the cache {cache} holds {manifest.get('hook')!r}, not the hook {found['hook']!r}; pass "
                          "the matching --cache, or none to harvest the hook's activations")
    return found


def build(a: argparse.Namespace) -> Path:
    """Load the SAEs and the model, get the activations, write the browser; return its index page."""
    from saelib.browser.pages import write_browser
    from saelib.core.checkpoints import load_sae
    from saelib.core.hooks import check_hook_point
    from saelib.subjects.activations import CacheSpec, get_or_build_cache, open_cache
    from saelib.subjects.language_models import load_subject_model

    for d in a.sae_dirs:
        _check_sae_dir(Path(d))
    where = resolve(a)
    saes = {Path(d).name: load_sae(d) for d in a.sae_dirs}
    if len(saes) < len(a.sae_dirs):
        raise BrowseError(f"the SAE folders {a.sae_dirs} share a name; the browser names each SAE by its folder")
    try:
        model = load_subject_model(where["model"], device=a.device)
    except (ValueError, FileNotFoundError, RuntimeError, ModuleNotFoundError) as e:
        raise BrowseError(f"cannot load the model {where['model']!r}: {e}\nPass --model with a model this machine "
                          "has (smollm2-135m, organism-<profile>, or a local model folder)") from e
    try:
        check_hook_point(model, where["hook"])
    except ValueError as e:
        raise BrowseError(f"{e}\nPass --hook with one of these (the hook the SAE was trained on)") from e
    if where["cache"]:
        table = open_cache(where["cache"])
    else:
        spec = CacheSpec(model=str(where["model"]), hook=where["hook"], corpus=where["corpus"], n_tokens=a.tokens,
                         context_size=min(a.context_size, model.cfg.n_ctx), split=a.split)
        try:
            table = get_or_build_cache(spec, model=model, progress=not a.no_progress)
        except (ValueError, OSError, MemoryError) as e:  # more text than the corpus has, or than the disk holds
            raise BrowseError(f"cannot harvest {a.tokens:,} tokens of {where['corpus']!r}: {e}; pass a smaller "
                              "--tokens") from None
    widths = {name: sae.cfg.d_in for name, sae in saes.items() if sae.cfg.d_in != table.d_in}
    if widths:
        raise BrowseError(f"{where['hook']} has width {table.d_in} but the SAEs {widths} read another width: "
                          "pass the --hook (and --model) they were trained on")
    summary = write_browser(saes, model, table, a.out, n_tokens=a.tokens, hook=where["hook"],
                            title=f"SAE features: {where['model']} {where['hook']}", progress=not a.no_progress)
    print(f"wrote {summary.index} ({summary.bytes / 1e6:.1f} MB, {len(saes)} SAE(s) over {summary.n_tokens:,} "
          f"tokens, {summary.seconds:.0f} s)")
    return summary.index


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saelib.browser.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR", help="saved SAE folder(s) of one model and hook")
    p.add_argument("--out", required=True, help="output folder (replaced); open OUT/index.html")
    p.add_argument("--model", help="subject model (default: the run config's data.model)")
    p.add_argument("--hook", help="hook point the SAEs read (default: the run config's data.hook)")
    p.add_argument("--corpus", help="text to harvest from (default: the run config's, else 'mixed')")
    p.add_argument("--cache", help="an existing activation cache folder to read instead of harvesting")
    p.add_argument("--tokens", type=int, default=200_000, help="tokens to scan (default 200000)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="documents to harvest from (default heldout: text the SAEs were not trained on)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per harvested window (default 128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point (``saelib browse`` can call it with its own argv)."""
    a = parser().parse_args(argv)
    if a.tokens <= 0:
        parser().error("--tokens must be positive")
    try:
        build(a)
    except (BrowseError, CheckpointError, DamagedError, OSError) as e:  # OSError: an --out it cannot write
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
