"""Saved SAEs in the ecosystem's formats: ``saelib export [--saelens P] [--saebench P] [--neuronpedia P] --out DIR``.

Each P is a `saelib train` run folder (every SAE under its ``saes/``), one saved SAE folder
(``config.json`` + ``sae.safetensors``) or an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

* ``--saelens``: ``DIR/NAME/`` in SAELens's layout (cfg.json with the run's metadata,
  sae_weights.safetensors, sparsity.safetensors from the training densities);
* ``--saebench``: ``DIR/NAME/saebench_core.json``, SAEBench's core evaluation on held-out text (a
  run's SAEs together: one harvest and one clean run for all);
* ``--neuronpedia``: ``DIR/neuronpedia/MODEL/LAYER-saelib-NAME/``, Neuronpedia's export layout of the
  features' examples, histograms and logit effects on held-out text.

The model, hook, corpus and context size come from the run's ``config.json`` (or the SAELens
folder's metadata), else from the flags; the last two need the model and harvest held-out windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from saelib.core.checkpoints import CheckpointError, load_sae
from saelib.core.sae import SAE
from saelib.core.saelens_io import SAELENS_METADATA_KEYS, export_saelens, read_saelens, run_metadata


class ExportError(ValueError):
    """Bad input to the command, with what to do about it."""


def sae_folders(path: Path) -> dict[str, Path]:
    """The SAE folders ``path`` names: itself (saelib or SAELens), or every ``saes/NAME`` of a run."""
    if ((path / "config.json").exists() and (path / "sae.safetensors").exists()) or (path / "cfg.json").exists():
        return {path.name: path}
    found = {p.name: p for p in sorted((path / "saes").glob("*")) if (p / "sae.safetensors").exists()}
    if not found:
        raise ExportError(f"{path} is not an SAE folder or a `saelib train` run: it needs config.json + "
                          "sae.safetensors (saelib), cfg.json + sae_weights.safetensors (SAELens) or saes/NAME folders")
    return found


def load_with_metadata(folder: Path) -> tuple[SAE, dict[str, Any]]:
    """The SAE in ``folder`` and its SAELens metadata (from its run's config.json for a saelib SAE)."""
    if (folder / "cfg.json").exists():
        read = read_saelens(folder)
        return read.sae, read.metadata
    try:
        data = json.loads((folder.parent.parent / "config.json").read_text()).get("data", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        data = {}
    return load_sae(folder), run_metadata(data if isinstance(data, dict) else {})


def _metadata_to_write(meta: dict) -> dict:
    """The SAELens keys of ``meta`` an export records again (the format version is the export's own)."""
    return {k: meta.get(k) for k in SAELENS_METADATA_KEYS if k != "sae_lens_version"}


def _setting(a: argparse.Namespace, meta: dict, flag: str, key: str, what: str, folder: Path) -> Any:
    value = getattr(a, flag) or meta.get(key)
    if value is None:
        raise ExportError(f"cannot tell the {what} of {folder}: its metadata has no {key} (no `saelib train` run "
                          f"config.json above it); pass --{flag.replace('_', '-')}")
    return value


class _Subject:
    """The model and held-out windows of one (model, hook) pair, loaded once for all SAEs."""

    def __init__(self, a: argparse.Namespace, meta: dict, folder: Path):
        from saelib.core.hooks import check_hook_point
        from saelib.subjects.activations import token_windows
        from saelib.subjects.language_models import load_subject_model

        self.model_name = str(_setting(a, meta, "model", "model_name", "model", folder))
        self.hook = str(_setting(a, meta, "hook", "hook_name", "hook", folder))
        self.corpus = a.corpus or meta.get("dataset_path") or "mixed"
        try:
            self.model = load_subject_model(self.model_name, device=a.device)
        except (ValueError, FileNotFoundError, RuntimeError, ModuleNotFoundError) as e:
            raise ExportError(f"cannot load the model {self.model_name!r}: {e}; pass --model") from e
        try:
            check_hook_point(self.model, self.hook)
        except ValueError as e:
            raise ExportError(f"{e}; pass --hook") from e
        context = min(a.context_size or meta.get("context_size") or 128, self.model.cfg.n_ctx)
        self.windows = token_windows(self.model.tokenizer, self.corpus, a.windows, context, split="heldout")


def run(a: argparse.Namespace) -> list[Path]:
    """Write what the flags ask for; return the files and folders written."""
    out, written = Path(a.out), []
    subjects: dict[tuple, _Subject] = {}

    def subject(meta: dict, folder: Path) -> _Subject:
        key = (a.model or meta.get("model_name"), a.hook or meta.get("hook_name"))
        if key not in subjects:
            subjects[key] = _Subject(a, meta, folder)
        return subjects[key]

    for name, folder in (sae_folders(Path(a.saelens)) if a.saelens else {}).items():
        sae, meta = load_with_metadata(folder)
        written.append(export_saelens(sae, out / name, _metadata_to_write(meta)))
    # SAEs of one model, hook and metadata (a run's) are evaluated together: one harvest and one
    # clean and zero-ablated run of the held-out windows for all of them.
    together: dict[tuple, tuple[_Subject, dict, dict]] = {}
    for name, folder in (sae_folders(Path(a.saebench)) if a.saebench else {}).items():
        sae, meta = load_with_metadata(folder)
        s, metadata = subject(meta, folder), _metadata_to_write(meta)
        key = (id(s), json.dumps(metadata, sort_keys=True, default=str))
        together.setdefault(key, (s, metadata, {}))[2][name] = sae
    for s, metadata, saes in together.values():
        from saelib.studies.saebench import core_eval_sweep, write_core_eval

        data = {"model": s.model_name, "hook": s.hook, "corpus": s.corpus}
        for name, envelope in core_eval_sweep(saes, s.model, s.windows, data, metadata=metadata).items():
            written.append(write_core_eval(envelope, out / name))
    for name, folder in (sae_folders(Path(a.neuronpedia)) if a.neuronpedia else {}).items():
        from saelib.browser.gather import TokenIndex, gather_features
        from saelib.browser.neuronpedia import export_neuronpedia
        from saelib.subjects.activations import harvest

        sae, meta = load_with_metadata(folder)
        s = subject(meta, folder)
        rows = harvest(s.model, [s.hook], s.windows, progress=False)[s.hook]
        data = gather_features({name: sae}, rows, tokens=TokenIndex.from_windows(s.windows), model=s.model,
                               hook=s.hook, progress=False)[name]
        written.append(export_neuronpedia(data, s.model.tokenizer, out / "neuronpedia",
                                          model_id=a.neuronpedia_model or Path(s.model_name).name, hook=s.hook,
                                          source_set="saelib-" + name.replace("_", "-"), dataset=s.corpus))
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelib export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saelens", metavar="RUN_OR_SAE", help="write SAELens folders of these SAEs")
    p.add_argument("--saebench", metavar="RUN_OR_SAE", help="write SAEBench core evaluations of these SAEs")
    p.add_argument("--neuronpedia", metavar="RUN_OR_SAE", help="write Neuronpedia exports of these SAEs' features")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="subject model (default: the run's data.model or the metadata's model_name)")
    p.add_argument("--hook", help="hook point (default: the run's data.hook or the metadata's hook_name)")
    p.add_argument("--corpus", help="held-out text (default: the run's corpus, else 'mixed')")
    p.add_argument("--windows", type=int, default=256, help="held-out windows to evaluate and browse (default 256)")
    p.add_argument("--context-size", type=int, help="tokens per window (default: the run's, at most the model's)")
    p.add_argument("--neuronpedia-model", help="the model's id on Neuronpedia (default: the model's name)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``saelib export``."""
    a = parser().parse_args(argv)
    if not (a.saelens or a.saebench or a.neuronpedia):
        parser().error("give at least one of --saelens, --saebench, --neuronpedia")
    if a.windows <= 0:
        parser().error("--windows must be positive")
    try:
        for path in run(a):
            print(f"wrote {path}")
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
