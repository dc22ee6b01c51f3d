"""Train SAEs from a TOML config: ``python -m saelib train CONFIG.toml [--set key=value ...] [--out DIR]``.

Sections (``--help-config`` lists every field with its type, default and documentation):

* ``[data]``: exactly one of ``cache = "DIR"`` (an existing activation cache), ``model`` + ``hook``
  (plus any other ``CacheSpec`` field: the cache is built on first use), or ``synthetic = {...}``
  (``saelib.core.synthetic.make_synthetic`` arguments);
* ``[train]``: ``TrainConfig`` fields;
* ``[sae.NAME]``: ``SAEConfig`` fields, one table per SAE trained side by side (``d_in`` defaults to
  the data's width);
* ``[export]``: ``ExportConfig`` fields (SAELens-format copies of the final SAEs, their SAEBench core
  evaluations).

The output folder gets ``config.json`` (the resolved config), ``checkpoints/``, ``history.csv``,
``history.jsonl``, ``saes/NAME`` and, when enabled, ``saelens/NAME``; for a run on a model (not
synthetic data) each ``saes/NAME`` (and ``saelens/NAME``) also gets ``saebench_core.json``, SAEBench's
core evaluation on held-out windows (``[export] saebench``). Running the same command again
resumes from the newest checkpoint (a finished run keeps the evaluations of its unchanged SAEs); a
folder made with a different config is refused.

Data-parallel: ``torchrun --nproc_per_node N -m saelib train CONFIG.toml`` (each rank reads its slice
of every global batch; rank 0 alone prints and writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import sys
import textwrap
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from saelib.core import distributed
from saelib.core.checkpoints import CheckpointError, check_same_config, latest_checkpoint
from saelib.core.fields import ConfigError, build, check_table, field_docs, fields_of, type_name
from saelib.core.sae import SAEConfig
from saelib.core.storage import DamagedError, atomic_json, atomic_text, read_json
from saelib.core.training import TrainConfig, train_config_dict
from saelib.core.validate import check, integer


@dataclass
class DataConfig:
    """Where the activations come from. Any CacheSpec field (model, hook, corpus, n_tokens, ...) may
    also be given here: with model and hook set, the cache is built on first use."""

    cache: str | None = None
    """Directory of an existing activation cache (saelib.subjects.activations.open_cache)."""
    synthetic: dict | None = None
    """Arguments of saelib.core.synthetic.make_synthetic (n_tokens, d, n_features, active, ...)."""
    cache_root: str | None = None
    """Where a cache built from model + hook goes (default: $SAELIB_CACHE/activations/<spec key>)."""


@dataclass
class ExportConfig:
    """Copies of the final SAEs in other formats, and their SAEBench core evaluations."""

    saelens: bool = False
    """Also write each final SAE in SAELens's layout to OUT/saelens/NAME."""
    model_name: str = ""
    """Model name recorded in the SAELens cfg.json (default: data.model)."""
    hook_name: str = ""
    """Hook name recorded in the SAELens cfg.json (default: data.hook)."""
    saebench: bool = True
    """Write SAEBench's core evaluation of each final SAE, on held-out windows of the run's model and
    corpus, to OUT/saes/NAME/saebench_core.json (and beside its SAELens copy). Needs a model: data.model
    + data.hook, or a cache that names them; synthetic runs have none and write no evaluation."""
    saebench_windows: int = 64
    """Held-out windows of data.context_size tokens the core evaluation reads."""

    def __post_init__(self) -> None:
        check(self, "saebench_windows", integer(1), "must be an integer >= 1")


@dataclass
class RunConfig:
    data: dict
    """The [data] table with defaults filled in (DataConfig, CacheSpec or make_synthetic fields)."""
    train: TrainConfig
    saes: dict[str, dict]
    """SAEConfig fields per SAE; d_in may be missing until the data is known."""
    export: ExportConfig

    def to_dict(self) -> dict:
        # The trainer's own form of the train section (JSON-ready, snapshot_steps left out while
        # empty), so runs saved before a field was added still resume.
        return {"data": self.data, "train": train_config_dict(self.train),
                "sae": self.saes, "export": dataclasses.asdict(self.export)}


def _cache_spec_class() -> type:
    # Imported lazily: saelib.subjects.activations pulls in TransformerLens, which synthetic runs never need.
    from saelib.subjects.activations import CacheSpec

    return CacheSpec


# ============================================================================ loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a", "b", "c"], VALUE parsed as a TOML value, else as a bare string)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # so that --set data.hook=blocks.3.hook_resid_post needs no quotes
    return key.strip().split("."), value


def _apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a table")
    node[path[-1]] = value


def _check_data(raw: dict) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"data: expected a table, got {type(raw).__name__}")
    own = fields_of(DataConfig)
    # CacheSpec is imported only when the table has keys beyond DataConfig's (see _cache_spec_class).
    spec = fields_of(_cache_spec_class()) if set(raw) - set(own) else {}
    data = check_table(raw, own | spec, "data")
    sources = [name for name, present in (("cache", "cache" in data), ("synthetic", "synthetic" in data),
                                          ("model + hook", bool(set(data) & set(spec)))) if present]
    if len(sources) != 1:
        raise ConfigError("data: give exactly one of data.cache, data.synthetic or data.model + data.hook "
                          f"(found: {', '.join(sources) or 'none'})")
    if spec:
        build(_cache_spec_class(), {k: v for k, v in data.items() if k in spec}, "data")
        return data | {k: f.default for k, f in spec.items() if k not in data}
    if "synthetic" in data:
        known = fields_of(_make_synthetic())
        synthetic = check_table(data["synthetic"], known, "data.synthetic")
        missing = [k for k, f in known.items() if f.default is dataclasses.MISSING and k not in synthetic]
        if missing:
            raise ConfigError(f"data.synthetic: missing required key(s) {', '.join(missing)}")
        data["synthetic"] = {k: synthetic.get(k, f.default) for k, f in known.items()}
    return data


def _make_synthetic() -> Callable:
    from saelib.core.synthetic import make_synthetic

    return make_synthetic


def _data_width(data: dict) -> int | None:
    """d_in when it is known without harvesting anything."""
    if "synthetic" in data:
        return data["synthetic"]["d"]
    if "cache" in data:
        return _open_cache(data["cache"]).d_in
    return None


def _open_cache(path: str) -> Any:
    from saelib.subjects.activations import open_cache

    try:
        return open_cache(path)
    except FileNotFoundError as e:  # a damaged cache raises DamagedError, with its own remedy
        raise ConfigError(f"data.cache: {e}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config (every error is a ConfigError naming its key)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    for item in overrides:
        _apply_override(raw, *parse_override(item))
    sections = {"data", "train", "sae", "export"}
    for key in raw:
        if key not in sections:
            close = difflib.get_close_matches(key, sections, n=1)
            raise ConfigError(f"{key}: unknown section; " + (f"did you mean {close[0]}?" if close else
                                                             f"valid: {', '.join(sorted(sections))}"))
    for key in ("data", "train", "sae"):
        if key not in raw:
            raise ConfigError(f"{path}: missing section [{key}]")
    data = _check_data(raw["data"])
    train = build(TrainConfig, check_table(raw["train"], fields_of(TrainConfig), "train"), "train")
    export = build(ExportConfig, check_table(raw.get("export", {}), fields_of(ExportConfig), "export"), "export")
    if not isinstance(raw["sae"], dict) or not raw["sae"]:
        raise ConfigError("sae: expected one or more [sae.NAME] tables")
    width = _data_width(data)
    saes = {}
    for name, table in raw["sae"].items():
        kwargs = check_table(table, fields_of(SAEConfig), f"sae.{name}")
        if width is not None:
            if kwargs.setdefault("d_in", width) != width:
                raise ConfigError(f"sae.{name}.d_in: {kwargs['d_in']} differs from the data's width {width}")
        # Validate now (before any data is built); d_in=1 stands in for a width not yet known.
        saes[name] = build(SAEConfig, {"d_in": 1} | kwargs, f"sae.{name}").to_dict() | (
            {} if "d_in" in kwargs else {"d_in": None})
    return RunConfig(data, train, saes, export)


def load_data(data: dict, progress: bool = True) -> Any:
    """The activation table the [data] section describes (a cache is harvested by rank 0 first)."""
    if "synthetic" in data:
        return _make_synthetic()(**data["synthetic"]).activations
    from saelib.subjects.activations import get_or_build_cache

    if "cache" in data:
        return _open_cache(data["cache"])
    spec = _cache_spec_class()(**{k: v for k, v in data.items() if k not in fields_of(DataConfig)})
    # Rank 0 harvests; the other ranks wait at the barrier, then open what it built.
    if distributed.rank() > 0:
        distributed.barrier()
    cache = get_or_build_cache(spec, root=data.get("cache_root"), progress=progress and distributed.rank() == 0)
    if distributed.rank() == 0:
        distributed.barrier()
    return cache


# ============================================================================ help


def help_config() -> str:
    """Every config field with its type, default and docstring, by section."""
    def section(title: str, cls: type, notes: dict[str, str] | None = None) -> list[str]:
        lines = [f"[{title}]", textwrap.indent(inspect.cleandoc(cls.__doc__ or ""), "  # ")]
        for name, (annotation, doc) in field_docs(cls).items():
            default = fields_of(cls)[name].default
            shown = (notes or {}).get(name) or ("required" if default is dataclasses.MISSING else
                                                f"default {json.dumps(default)}")
            lines.append(f"  {name}: {annotation} ({shown})")
            if doc:
                lines.append(textwrap.indent(textwrap.fill(doc, 92), "      "))
        return lines + [""]

    synth = fields_of(_make_synthetic())
    lines = section("data", DataConfig) + section("data (CacheSpec fields, with model + hook)", _cache_spec_class())
    lines += ["[data.synthetic]  (saelib.core.synthetic.make_synthetic)"]
    lines += [f"  {k}: {type_name(f.type)} ({'required' if f.default is dataclasses.MISSING else f'default {f.default!r}'})"
              for k, f in synth.items()] + [""]
    lines += section("train", TrainConfig)
    lines += section("sae.NAME", SAEConfig, {"d_in": "default: the data's width"})
    lines += section("export", ExportConfig)
    return "\n".join(lines)


# ============================================================================ run


def _check_out_dir(out: Path, cfg: dict) -> None:
    """Refuse to resume a run in ``out`` made with another config. Only a folder with checkpoints is
    compared: a config.json alone is what a start that failed before its first checkpoint left, and
    the new run replaces it. A larger train.steps continues the run (``train_saes``)."""
    saved = out / "config.json"
    if not saved.exists() or latest_checkpoint(out) is None:
        return
    old = read_json(saved, f"delete {out} to start over")
    # export may change between runs: it only affects what is written after training.
    wanted = {k: cfg[k] for k in ("data", "train", "sae")}
    found = {k: old.get(k) for k in ("data", "train", "sae")}
    if isinstance(found["train"], dict) and "steps" in found["train"]:
        found["train"] = {**found["train"], "steps": wanted["train"]["steps"]}  # checked by train_saes
    check_same_config(wanted, found, what=f"the run in {out} (see {saved})")


def _cache_spec_of(data: dict) -> Any:
    """The CacheSpec of a run's activations (None for synthetic data, which has no model)."""
    if "synthetic" in data:
        return None
    if "cache" in data:
        return _open_cache(data["cache"]).spec
    return _cache_spec_class()(**{k: v for k, v in data.items() if k not in fields_of(DataConfig)})


def _core_eval_settings(cfg: RunConfig, spec: Any) -> dict:
    """What a run's core evaluation depends on besides the weights (recorded in each envelope)."""
    return {"saebench_windows": cfg.export.saebench_windows, "data": asdict(spec), "metadata": run_metadata_of(cfg)}


def write_core_evals(cfg: RunConfig, saes: dict, out: Path, progress: bool = True,
                     previous: dict[str, dict] | None = None) -> dict[str, Path]:
    """SAEBench's core evaluation of each SAE of the run in ``out`` on held-out windows of its model
    and corpus, into ``saes/NAME`` (and ``saelens/NAME`` where exported); a synthetic run writes none.
    Every run rewrites ``saes/NAME`` whole, so an evaluation never outlives the weights it measured:
    ``previous`` (``saved_core_evals`` of ``saes/``, read before training) is written back for an SAE whose
    weights (digest) and evaluation settings are unchanged, so a rerun of a finished run neither
    loads the model nor evaluates again; every other SAE is evaluated."""
    from saelib.studies.saebench import CORE_FILENAME, core_eval_sweep, still_valid
    from saelib.studies.saebench import write_core_evals as write
    from saelib.subjects.activations import at_precision, token_windows
    from saelib.subjects.language_models import load_subject_model

    spec = _cache_spec_of(cfg.data)
    if spec is None:
        return {}
    settings = _core_eval_settings(cfg, spec)
    previous = previous or {}
    envelopes = {name: previous[name] for name, sae in saes.items() if still_valid(previous.get(name), sae, settings)}
    todo = {name: sae for name, sae in saes.items() if name not in envelopes}
    if todo:
        try:
            model = at_precision(load_subject_model(spec.model, checkpoint=spec.checkpoint), spec.model_dtype)
        except (ValueError, OSError, RuntimeError, ModuleNotFoundError) as e:  # e.g. a cache from elsewhere
            print(f"no SAEBench core evaluation: cannot load the model {spec.model!r} ({e}); set "
                  "export.saebench = false to skip it", file=sys.stderr)
            return {}
        windows = token_windows(model.tokenizer, spec.corpus, cfg.export.saebench_windows, spec.context_size,
                                seed=spec.seed, split="heldout")
        envelopes |= core_eval_sweep(todo, model, windows, spec, progress=progress, metadata=run_metadata_of(cfg),
                                     settings=settings)
    if len(envelopes) > len(todo):
        print(f"SAEBench core evaluation: {len(envelopes) - len(todo)} of {len(saes)} SAEs unchanged since "
              "their envelope was written; kept", file=sys.stderr)
    written = write(envelopes, out / "saes")
    if cfg.export.saelens:
        for name, path in written.items():
            atomic_text(path.read_text(), out / "saelens" / name / CORE_FILENAME)
    return written


def run_metadata_of(cfg: RunConfig) -> dict:
    """The SAELens metadata of a run's SAEs: its data table's, with [export]'s model and hook names."""
    from saelib.core.saelens_io import run_metadata

    metadata = run_metadata(cfg.data)
    metadata.update({k: v for k, v in (("model_name", cfg.export.model_name),
                                        ("hook_name", cfg.export.hook_name)) if v})
    return metadata


def run(cfg: RunConfig, out: Path, progress: bool = True) -> Any:
    """Train the configured SAEs into ``out`` (resuming a run already there); returns the TrainResult."""
    from saelib.core.saelens_io import export_saelens
    from saelib.core.training import train_saes

    rank0 = distributed.rank() == 0
    data = load_data(cfg.data, progress)
    width = int(data[torch.arange(1)].shape[-1])
    for name, sae in cfg.saes.items():
        if sae["d_in"] is None:
            sae["d_in"] = width
    saes = {name: build(SAEConfig, kw, f"sae.{name}") for name, kw in cfg.saes.items()}
    if cfg.train.batch_size > len(data):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} rows per step but the data has {len(data)} "
                          f"rows; use batch_size <= {len(data)}")
    resolved = cfg.to_dict()
    _check_out_dir(out, resolved)
    distributed.barrier()  # every rank has read the old config.json before rank 0 replaces it
    if rank0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_json(resolved, out / "config.json")
        except OSError as e:
            raise ConfigError(f"cannot write the output folder {out}: {e}") from None
    from saelib.studies.saebench import saved_core_evals

    # read before training rewrites the SAE folders: a rerun keeps what still applies
    previous = saved_core_evals(out / "saes") if rank0 and cfg.export.saebench else {}
    result = train_saes(saes, data, cfg.train, out_dir=out, progress=progress)
    if rank0:
        atomic_text(result.history.to_json(orient="records", lines=True), out / "history.jsonl")
        if cfg.export.saelens:
            metadata = run_metadata_of(cfg)
            for name, sae in result.saes.items():
                export_saelens(sae, out / "saelens" / name, metadata)
        if cfg.export.saebench:
            write_core_evals(cfg, result.saes, out, progress, previous)
        if len(result.history):
            last = result.history.groupby("sae").tail(1)
            print(last[["sae", "step", "nmse", "l0", "dead_frac"]].to_string(index=False))
        print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saelib train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 --set sae.topk.k=64 (TOML syntax)")
    p.add_argument("--out", help="output folder (default: runs/<config name>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.help_config:
        print(help_config())
        return
    if a.config is None:
        p.error("a config file is required")
    distributed.init_from_env()
    try:
        cfg = load_config(a.config, a.overrides)
        if a.print_config:
            if distributed.rank() == 0:
                print(json.dumps(cfg.to_dict(), indent=2))
            return
        run(cfg, Path(a.out) if a.out else Path("runs") / Path(a.config).stem, progress=not a.no_progress)
    except (ConfigError, CheckpointError, DamagedError, OSError) as e:  # OSError: a full disk, say
        if distributed.rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if distributed.is_distributed():
            torch.distributed.destroy_process_group()
