"""saelib's core evaluation under SAEBench's metric names and JSON envelope (its "core" eval).

One computation, two presentations: ``core_envelopes`` writes saelib's own measurements of an SAE on
held-out data (``saelib.core.metrics.evaluate`` for the reconstruction and sparsity metrics,
``saelib.studies.splice.splice_sweep`` for the CE and KL scores, both as a chapter's table has them)
under SAEBench's names; ``core_eval_sweep`` (``core_eval`` for one SAE) makes those measurements on
held-out windows of a model. ``write_core_eval`` checks the envelope against SAEBench's core schema
and writes ``saebench_core.json`` beside a saved SAE, sealed with its sha256 and naming the weights it
evaluates (``saelib.core.checkpoints.sae_digest``); ``read_core_eval`` verifies both at load.
``saelib train`` writes one for every SAE of a run on a model, and chapter 2 for its main SAEs.

The schema checked here (``CORE_SCHEMA``) is written from the definitions of SAEBench 0.6.0
(``sae_bench/evals/core/eval_output.py``, ``eval_config.py``, ``base_eval_output.py`` and the
``eval_output_schema_core.json`` they generate): the same fields, types and required keys. SAEBench
ships no licence, so its schema file is not vendored.

The definitions follow the installed SAELens 6.x evals (SAEBench's core eval is SAELens's), per
evaluated token t with activation x_t, reconstruction x̂_t and codes f_t:

* ``mse`` = mean_t |x_t - x̂_t|² (summed over dimensions); ``explained_variance`` = 1 - mse / (mean_t
  |x_t|² - |mean_t x_t|²), i.e. 1 - saelib's NMSE; ``explained_variance_legacy`` = mean_t of 1 -
  |x_t - x̂_t|² / |x_t - x̄|², with x̄ the mean over the whole window (SAELens uses each batch's);
  ``cossim`` = mean_t cos(x_t, x̂_t).
* ``l2_ratio`` = mean_t |x̂_t| / |x_t|; ``relative_reconstruction_bias`` = mean_t |x̂_t|² / mean_t
  <x_t, x̂_t>, pooled over the window (SAELens averages it over batches).
* ``l0`` = mean_t of nonzero codes (saelib's L0), ``l1`` = mean_t sum_i |f_ti|.
* ``ce_loss_score`` = (CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean): saelib's fraction
  recovered; ``kl_div_score`` = (KL zero-ablated - KL spliced) / KL zero-ablated.
* ``frac_alive`` and ``freq_over_*``: from each feature's density over the evaluated tokens.

Codes are in saelib's units, which are the SAELens export's (the export folds the input scale into
its weights); the per-feature encoder norms and biases are those of the export too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from saelib.core.checkpoints import sae_digest
from saelib.core.devices import to_device_of
from saelib.core.metrics import Evaluation, evaluate
from saelib.core.sae import SAE
from saelib.core.saelens_io import run_metadata, saelens_config
from saelib.core.storage import DamagedError, atomic_json, read_json
from saelib.studies.splice import SpliceResult, splice_sweep
from saelib.subjects.activations import harvest

__all__ = ["CORE_SCHEMA", "SchemaError", "core_eval", "core_eval_sweep", "core_envelope", "core_envelopes",
           "kept_core_evals", "saved_core_evals", "still_valid",
           "check_core_envelope", "core_summary", "write_core_eval", "write_core_evals", "read_core_eval", "CORE_FILENAME"]

CORE_FILENAME = "saebench_core.json"
NOT_SAEBENCH = "none: computed by saelib, not by SAEBench's runner"
"""``sae_bench_commit_hash`` (a required string): no SAEBench commit ran this evaluation."""

NUMBER, INTEGER, STRING, BOOLEAN, OBJECT, ARRAY = "number", "integer", "string", "boolean", "object", "array"
CORE_SCHEMA: dict[str, Any] = {
    "top": {  # field: (types, required); "null" allowed where SAEBench's field is Optional
        "eval_type_id": ((STRING,), False), "eval_config": ((OBJECT,), True), "eval_id": ((STRING,), True),
        "datetime_epoch_millis": ((INTEGER,), True), "eval_result_metrics": ((OBJECT,), True),
        "eval_result_details": ((ARRAY,), False), "sae_bench_commit_hash": ((STRING,), True),
        "sae_lens_id": ((STRING, "null"), True), "sae_lens_release_id": ((STRING, "null"), True),
        "sae_lens_version": ((STRING, "null"), True), "sae_cfg_dict": ((OBJECT, "null"), True),
    },
    "eval_config": {  # every field has a default in SAEBench: optional, but typed
        "model_name": STRING, "llm_dtype": STRING, "batch_size_prompts": INTEGER,
        "n_eval_reconstruction_batches": INTEGER, "n_eval_sparsity_variance_batches": INTEGER, "dataset": STRING,
        "context_size": INTEGER, "compute_kl": BOOLEAN, "compute_ce_loss": BOOLEAN, "compute_l2_norms": BOOLEAN,
        "compute_sparsity_metrics": BOOLEAN, "compute_variance_metrics": BOOLEAN,
        "compute_featurewise_density_statistics": BOOLEAN, "compute_featurewise_weight_based_metrics": BOOLEAN,
        "exclude_special_tokens_from_reconstruction": BOOLEAN, "verbose": BOOLEAN,
    },
    "metrics": {  # every group and every metric in it is required
        "model_behavior_preservation": {"kl_div_score": NUMBER, "kl_div_with_ablation": NUMBER,
                                        "kl_div_with_sae": NUMBER},
        "model_performance_preservation": {"ce_loss_score": NUMBER, "ce_loss_with_ablation": NUMBER,
                                           "ce_loss_with_sae": NUMBER, "ce_loss_without_sae": NUMBER},
        "reconstruction_quality": {"explained_variance": NUMBER, "explained_variance_legacy": NUMBER,
                                   "mse": NUMBER, "cossim": NUMBER},
        "shrinkage": {"l2_norm_in": NUMBER, "l2_norm_out": NUMBER, "l2_ratio": NUMBER,
                      "relative_reconstruction_bias": NUMBER},
        "sparsity": {"l0": NUMBER, "l1": NUMBER},
        "token_stats": {"total_tokens_eval_reconstruction": INTEGER, "total_tokens_eval_sparsity_variance": INTEGER},
        "misc_metrics": {"freq_over_1_percent": NUMBER, "freq_over_10_percent": NUMBER,
                         "normalized_freq_over_1_percent": NUMBER, "normalized_freq_over_10_percent": NUMBER,
                         "average_max_encoder_cosine_sim": NUMBER, "average_max_decoder_cosine_sim": NUMBER,
                         "frac_alive": NUMBER},
    },
    "detail": {  # each eval_result_details entry: all required
        "index": INTEGER, "feature_density": NUMBER, "consistent_activation_heuristic": NUMBER,
        "encoder_bias": NUMBER, "encoder_norm": NUMBER, "encoder_decoder_cosine_sim": NUMBER,
        "max_decoder_cosine_sim": NUMBER, "max_encoder_cosine_sim": NUMBER,
    },
}
"""SAEBench 0.6.0's core eval output, field by field (see the module docstring for the source)."""


class SchemaError(ValueError):
    """An envelope does not match SAEBench's core schema (the message names the field)."""


def _is(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == NUMBER:  # JSON numbers: no NaN or infinity, and a bool is not one
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return {INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool), STRING: lambda v: isinstance(v, str),
            BOOLEAN: lambda v: isinstance(v, bool), OBJECT: lambda v: isinstance(v, dict),
            ARRAY: lambda v: isinstance(v, list)}[kind](value)


def _check(value: Any, kinds: tuple[str, ...], where: str) -> None:
    if not any(_is(value, k) for k in kinds):
        raise SchemaError(f"SAEBench core schema: {where} must be {' or '.join(kinds)}, got {value!r:.60}")


def check_core_envelope(doc: Mapping[str, Any]) -> None:
    """Raise SchemaError (one line, naming the field) unless ``doc`` matches SAEBench's core schema."""
    _check(doc, (OBJECT,), "the envelope")
    for key, (kinds, required) in CORE_SCHEMA["top"].items():
        if key not in doc:
            if required:
                raise SchemaError(f"SAEBench core schema: missing required field {key}")
            continue
        _check(doc[key], kinds, key)
    if doc.get("eval_type_id", "core") != "core":
        raise SchemaError(f"SAEBench core schema: eval_type_id must be 'core', got {doc['eval_type_id']!r}")
    if not 0 <= doc["datetime_epoch_millis"] <= 9_999_999_999_999:  # SAEBench's own validator
        raise SchemaError(f"SAEBench core schema: datetime_epoch_millis {doc['datetime_epoch_millis']} is not "
                          "a time in epoch milliseconds")
    for key, kind in CORE_SCHEMA["eval_config"].items():
        if key in doc["eval_config"]:
            _check(doc["eval_config"][key], (kind,), f"eval_config.{key}")
    for group, fields in CORE_SCHEMA["metrics"].items():
        if group not in doc["eval_result_metrics"]:
            raise SchemaError(f"SAEBench core schema: missing metric group eval_result_metrics.{group}")
        values = doc["eval_result_metrics"][group]
        _check(values, (OBJECT,), f"eval_result_metrics.{group}")
        for key, kind in fields.items():
            if key not in values:
                raise SchemaError(f"SAEBench core schema: missing metric eval_result_metrics.{group}.{key}")
            _check(values[key], (kind,), f"eval_result_metrics.{group}.{key}")
    for i, detail in enumerate(doc.get("eval_result_details") or []):
        _check(detail, (OBJECT,), f"eval_result_details[{i}]")
        for key, kind in CORE_SCHEMA["detail"].items():
            if key not in detail:
                raise SchemaError(f"SAEBench core schema: missing eval_result_details[{i}].{key}")
            _check(detail[key], (kind,), f"eval_result_details[{i}].{key}")


# ============================================================================ measuring

def _max_other_cosine(rows: Tensor, chunk: int = 1024) -> Tensor:
    """For each row, its largest cosine similarity with any other row."""
    unit = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = torch.empty(len(unit))
    for lo in range(0, len(unit), chunk):
        sims = unit[lo:lo + chunk] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(lo, lo + len(sims))] = -math.inf
        out[lo:lo + chunk] = sims.max(1).values
    return out


@torch.no_grad()
def _reconstruction_stats(sae: SAE, x: Tensor, window: Tensor, n_windows: int, batch_size: int) -> dict[str, Any]:
    """The per-token sums SAELens's variance, shrinkage and L1 metrics need, and per-feature window counts."""
    mean = x.double().mean(0)
    sums = dict.fromkeys(("cossim", "l2_in", "l2_out", "l2_ratio", "xhat_sq", "x_dot_xhat", "l1", "ev_legacy",
                          "sq_err"), 0.0)
    fired_windows = torch.zeros(n_windows, sae.cfg.d_sae, dtype=torch.bool)
    was_training = sae.training
    sae.eval()
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size]
        out = sae(to_device_of(xb, sae))
        # Sums and the window index are on the CPU, where x is.
        x_hat, codes = out.x_hat.double().cpu(), out.codes
        xd = xb.double()
        n_in, n_out = xd.norm(dim=1), x_hat.norm(dim=1)
        err = (xd - x_hat).pow(2).sum(1)
        sums["sq_err"] += float(err.sum())
        sums["cossim"] += float(((xd * x_hat).sum(1) / (n_in * n_out).clamp(min=1e-12)).sum())
        sums["l2_in"] += float(n_in.sum())
        sums["l2_out"] += float(n_out.sum())
        sums["l2_ratio"] += float((n_out / torch.where(n_in.abs() < 1e-4, 1.0, n_in)).sum())
        sums["xhat_sq"] += float(n_out.pow(2).sum())
        sums["x_dot_xhat"] += float((xd * x_hat).sum())
        sums["l1"] += float(codes.values.double().abs().sum())
        sums["ev_legacy"] += float((1 - err / (xd - mean).pow(2).sum(1)).sum())
        fired_windows[window[lo + codes.rows.cpu()], codes.cols.cpu()] = True
    sae.train(was_training)
    return sums | {"fired_windows": fired_windows.sum(0)}


def core_envelope(sae: SAE, ev: Evaluation, splice: SpliceResult, stats: Mapping[str, Any], *,
                  model_name: str, dataset: str, context_size: int, batch_size: int, n_batches: int,
                  exclude_bos: bool, metadata: Mapping[str, Any] | None = None, n_variance_batches: int | None = None,
                  llm_dtype: str = "float32", notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SAEBench's core envelope from saelib's measurements of one SAE (``core_envelopes`` makes them).

    ``n_batches``: batches of ``batch_size`` windows the splice read; ``n_variance_batches`` those of
    the reconstruction rows (default ``n_batches``). ``notes`` join saelib's own record
    (``eval_result_unstructured.saelib``)."""
    n = ev.n_tokens
    density = ev.density.double()
    total = float(density.sum())
    enc = (sae.encoder.detach() * float(sae.input_scale)).double()  # the SAELens export's W_enc, one row per feature
    dec = sae.decoder.detach().double()
    max_enc, max_dec = _max_other_cosine(enc), _max_other_cosine(dec)
    b_enc = sae.b_enc.detach()
    enc_dec = (enc * dec).sum(1) / (enc.norm(dim=1) * dec.norm(dim=1)).clamp(min=1e-12)
    fires = (density * n).round()  # counts again (density is a float32 ratio)
    # SAEBench writes -1 where a heuristic is 0/0 (a feature that never fired), as JSON has no NaN.
    cah = torch.where(stats["fired_windows"] > 0, fires / stats["fired_windows"].clamp(min=1), -1.0)
    details = [{"index": i, "feature_density": float(density[i]), "consistent_activation_heuristic": float(cah[i]),
                "encoder_bias": float(b_enc[i]), "encoder_norm": float(enc[i].norm()),
                "encoder_decoder_cosine_sim": float(enc_dec[i]), "max_decoder_cosine_sim": float(max_dec[i]),
                "max_encoder_cosine_sim": float(max_enc[i])} for i in range(sae.cfg.d_sae)]

    def share(above: float) -> float:
        return float(density[density > above].sum() / total) if total > 0 else 0.0

    metrics = {
        "model_behavior_preservation": {
            "kl_div_score": (splice.kl_zero_ablation - splice.kl) / splice.kl_zero_ablation,
            "kl_div_with_ablation": splice.kl_zero_ablation, "kl_div_with_sae": splice.kl},
        "model_performance_preservation": {
            "ce_loss_score": splice.fraction_recovered, "ce_loss_with_ablation": splice.ce_zero_ablation,
            "ce_loss_with_sae": splice.ce_spliced, "ce_loss_without_sae": splice.ce_clean},
        "reconstruction_quality": {
            "explained_variance": 1 - ev.nmse, "explained_variance_legacy": stats["ev_legacy"] / n,
            "mse": stats["sq_err"] / n, "cossim": stats["cossim"] / n},
        "shrinkage": {"l2_norm_in": stats["l2_in"] / n, "l2_norm_out": stats["l2_out"] / n,
                      "l2_ratio": stats["l2_ratio"] / n,
                      "relative_reconstruction_bias": stats["xhat_sq"] / stats["x_dot_xhat"]},
        "sparsity": {"l0": ev.l0, "l1": stats["l1"] / n},
        "token_stats": {"total_tokens_eval_reconstruction": splice.n_tokens, "total_tokens_eval_sparsity_variance": n},
        "misc_metrics": {
            "freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.1).double().mean()),
            "normalized_freq_over_1_percent": share(0.01), "normalized_freq_over_10_percent": share(0.1),
            "average_max_encoder_cosine_sim": float(max_enc.mean()),
            "average_max_decoder_cosine_sim": float(max_dec.mean()), "frac_alive": ev.alive / sae.cfg.d_sae},
    }
    config = {"model_name": model_name, "llm_dtype": llm_dtype, "batch_size_prompts": batch_size,
              "n_eval_reconstruction_batches": n_batches,
              "n_eval_sparsity_variance_batches": n_batches if n_variance_batches is None else n_variance_batches,
              "dataset": dataset, "context_size": context_size, "compute_kl": True, "compute_ce_loss": True,
              "compute_l2_norms": True, "compute_sparsity_metrics": True, "compute_variance_metrics": True,
              "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
              "exclude_special_tokens_from_reconstruction": exclude_bos, "verbose": False}
    return {
        "eval_type_id": "core", "eval_config": config, "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
        "eval_result_details": details, "sae_bench_commit_hash": NOT_SAEBENCH, "sae_lens_id": None,
        "sae_lens_release_id": None, "sae_lens_version": None, "sae_cfg_dict": saelens_config(sae, metadata),
        "eval_result_unstructured": {"saelib": {
            "nmse": ev.nmse, "ce_increase": splice.ce_increase, "fraction_recovered": splice.fraction_recovered,
            "explained_variance_centred_residual": ev.explained_variance, "dead_features": ev.dead,
            "sae_digest": sae_digest(sae), **dict(notes or {})}},
    }


def _data_fields(data: Any) -> dict[str, Any]:
    """The CacheSpec fields of ``data`` (a CacheSpec, or a `saelib train` run's data table)."""
    fields = asdict(data) if is_dataclass(data) else dict(data)
    if not fields.get("hook"):
        raise ValueError("core evaluation: data names no hook; give the CacheSpec (or its fields model, hook, "
                         "corpus, context_size, exclude_bos) the rows were harvested with")
    return {"model": "", "corpus": "mixed", "context_size": 128, "exclude_bos": True,
            "model_dtype": "float32"} | fields


def core_envelopes(saes: Mapping[str, SAE], rows: Any, splices: Mapping[str, SpliceResult], data: Any, *,
                   evals: Mapping[str, Evaluation] | None = None, window: Tensor | None = None,
                   batch_size: int = 8, llm_dtype: str = "float32", max_norm: float | None = None,
                   metadata: Mapping[str, Any] | None = None,
                   settings: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """SAEBench's core envelope of each SAE from saelib's own measurements on held-out data.

    ``rows``: the held-out activations at the hook, a tensor [n, d_in] or a table with ``locate`` (an
    activation cache, or ``drop_norm_outliers``'s rows, whose windows and norm threshold it reads).
    ``splices``: each SAE's ``splice_sweep`` result (CE and KL) on held-out windows of ``batch_size``.
    ``evals``: ``evaluate(sae, rows)`` where the caller has it (a chapter's table), else computed, so
    the envelope's ``l0``, ``explained_variance`` (1 - NMSE) and ``frac_alive`` are that evaluation's.
    ``data``: the CacheSpec (or its fields) the rows were harvested with; it fills ``eval_config`` and
    ``sae_cfg_dict`` (``metadata`` overrides the SAELens metadata). ``window``: each row's window
    (default: rows in harvest order, ``context_size - exclude_bos`` per window). ``settings``: what
    else the evaluation depended on (held-out sizes, say), recorded for ``still_valid``."""
    data = _data_fields(data)
    rows_per_window = data["context_size"] - int(data["exclude_bos"])
    if hasattr(rows, "locate"):
        window = torch.as_tensor(rows.locate(np.arange(len(rows)))[0]) if window is None else window
        max_norm = getattr(rows, "threshold", None) if max_norm is None else max_norm
        rows = rows[:]
    window = torch.arange(len(rows)) // rows_per_window if window is None else torch.as_tensor(window).long()
    if len(window) != len(rows):
        raise ValueError(f"window names {len(window)} rows' windows, rows has {len(rows)}")
    _, window = torch.unique(window, return_inverse=True)  # 0..windows-1, for the per-window counts
    n_windows = int(window.max()) + 1 if len(window) else 0
    metadata = run_metadata(data) if metadata is None else metadata
    out = {}
    for name, sae in saes.items():
        if name not in splices:
            raise ValueError(f"no splice result for SAE {name!r}: splices has {sorted(splices)}")
        ev = evals[name] if evals is not None and name in evals else evaluate(sae, rows)
        if ev.n_tokens != len(rows):
            raise ValueError(f"evals[{name!r}] measured {ev.n_tokens} rows, rows has {len(rows)}: pass the "
                             "evaluation of these rows")
        splice = splices[name]
        stats = _reconstruction_stats(sae, rows, window, n_windows, 4096)
        spliced_windows = splice.n_tokens // (data["context_size"] - 1)  # every position but the last predicts
        out[name] = core_envelope(
            sae, ev, splice, stats, model_name=str(data["model"]), dataset=str(data["corpus"]),
            context_size=int(data["context_size"]), batch_size=batch_size,
            n_batches=math.ceil(spliced_windows / batch_size), n_variance_batches=math.ceil(n_windows / batch_size),
            exclude_bos=bool(data["exclude_bos"]), metadata=metadata, llm_dtype=llm_dtype,
            notes={"hook": data["hook"], "activations_dtype": data["model_dtype"], "max_norm": max_norm,
                   "eval_settings": _plain(settings or {})})
    return out


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as JSON reads it back, so that a recorded copy compares equal to a fresh one."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


def still_valid(envelope: Mapping[str, Any] | None, sae: SAE, settings: Mapping[str, Any] | None = None) -> bool:
    """Whether ``envelope`` (``read_core_eval``'s, or None) evaluates exactly these weights under these
    ``settings`` (``core_envelopes``'): then a rerun can keep it instead of evaluating again."""
    own = ((envelope or {}).get("eval_result_unstructured") or {}).get("saelib") or {}
    return own.get("sae_digest") == sae_digest(sae) and own.get("eval_settings") == _plain(settings or {})


def saved_core_evals(root: str | Path) -> dict[str, dict[str, Any]]:
    """Every envelope saved under ``root`` (``root/NAME/saebench_core.json``) that verifies
    (``read_core_eval``), by NAME; a damaged one is left out, for the caller to evaluate again."""
    saved = {}
    for path in sorted(Path(root).glob(f"*/{CORE_FILENAME}")):
        try:
            saved[path.parent.name] = read_core_eval(path.parent)
        except DamagedError:
            continue
    return saved


def kept_core_evals(saes: Mapping[str, SAE], root: str | Path,
                    settings: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The envelopes in ``root/NAME`` still valid for these SAEs (``still_valid``); a missing,
    damaged or stale one is left out, for the caller to evaluate again."""
    return {name: envelope for name, envelope in saved_core_evals(root).items()
            if name in saes and still_valid(envelope, saes[name], settings)}


def core_eval_sweep(saes: Mapping[str, SAE], model, windows: Tensor, data: Any, *, batch_size: int = 8,
                    progress: bool = False, metadata: Mapping[str, Any] | None = None,
                    settings: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """SAEBench's core envelope of each SAE at ``data``'s hook of ``model`` on ``windows`` [n, ctx]
    (held-out): one harvest and one clean and zero-ablated run shared by every SAE.

    The reconstruction metrics read the windows' activations at the hook (positions 1.. with
    ``exclude_bos``, the rows SAEs are trained on); the CE and KL scores splice each SAE in on the
    same windows (position 0 left as it is with ``exclude_bos``)."""
    data = _data_fields(data) | {"context_size": windows.shape[1]}
    hook, exclude_bos = data["hook"], data["exclude_bos"]
    rows = harvest(model, [hook], windows, batch_size=batch_size, exclude_bos=exclude_bos, progress=progress)[hook]
    splices = splice_sweep(model, hook, saes, windows, batch_size=batch_size, exclude_bos=exclude_bos,
                           progress=progress)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return core_envelopes(saes, rows, splices, data, batch_size=batch_size, llm_dtype=dtype, metadata=metadata,
                          settings=settings)


def core_eval(sae: SAE, model, hook: str, windows: Tensor, *, batch_size: int = 8, exclude_bos: bool = True,
              dataset: str = "", model_name: str = "", metadata: Mapping[str, Any] | None = None,
              progress: bool = False) -> dict[str, Any]:
    """SAEBench's core envelope for one ``sae`` at ``hook`` of ``model`` on ``windows`` [n, ctx] (held-out):
    ``core_eval_sweep`` of one SAE. ``metadata``: SAELens metadata for ``sae_cfg_dict``
    (``saelib.core.saelens_io.run_metadata``)."""
    data = {"model": model_name, "hook": hook, "corpus": dataset, "exclude_bos": exclude_bos}
    return core_eval_sweep({"sae": sae}, model, windows, data, batch_size=batch_size, progress=progress,
                           metadata={} if metadata is None else metadata)["sae"]


SUMMARY = {"l0": "sparsity", "explained_variance": "reconstruction_quality",
           "ce_loss_score": "model_performance_preservation", "kl_div_score": "model_behavior_preservation",
           "frac_alive": "misc_metrics", "cossim": "reconstruction_quality", "l2_ratio": "shrinkage"}
"""The headline metrics of a core envelope and the group each sits in."""


def core_summary(envelope: Mapping[str, Any]) -> dict[str, float]:
    """The envelope's headline metrics by their SAEBench names (``SUMMARY``), one flat row."""
    metrics = envelope["eval_result_metrics"]
    return {name: metrics[group][name] for name, group in SUMMARY.items()}


# ============================================================================ on disk

def _seal(envelope: Mapping[str, Any]) -> str:
    """sha256 of the envelope's JSON, without the seal itself."""
    doc = copy.deepcopy(dict(envelope))
    doc.get("eval_result_unstructured", {}).get("saelib", {}).pop("envelope_sha256", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def write_core_eval(envelope: Mapping[str, Any], folder: str | Path) -> Path:
    """Check ``envelope`` against the schema and write it to ``folder/saebench_core.json`` (atomically),
    sealed with its own sha256 (``read_core_eval`` checks it)."""
    check_core_envelope(envelope)
    doc = copy.deepcopy(dict(envelope))
    doc.setdefault("eval_result_unstructured", {}).setdefault("saelib", {})["envelope_sha256"] = _seal(doc)
    path = Path(folder) / CORE_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(doc, path)
    return path


def write_core_evals(envelopes: Mapping[str, Mapping[str, Any]], root: str | Path) -> dict[str, Path]:
    """``write_core_eval`` of each envelope into ``root/NAME`` (the saved SAE of that name)."""
    return {name: write_core_eval(env, Path(root) / name) for name, env in envelopes.items()}


def read_core_eval(folder: str | Path, sae: SAE | None = None) -> dict[str, Any]:
    """The envelope saved in ``folder``, verified: valid JSON, SAEBench's schema, its seal and, with
    ``sae``, that it evaluates these weights; otherwise ``DamagedError`` naming the file and the remedy."""
    path = Path(folder) / CORE_FILENAME
    advice = (f"delete {path} and rerun what wrote it (`saelib train`, the chapter, or "
              f"`saelib export --saebench {Path(folder)}`)")
    doc = read_json(path, advice)
    try:
        check_core_envelope(doc)
    except SchemaError as e:
        raise DamagedError(f"{path} is damaged: {e}; {advice}") from None
    own = (doc.get("eval_result_unstructured") or {}).get("saelib") or {}
    if own.get("envelope_sha256") != _seal(doc):
        raise DamagedError(f"{path} is damaged: its contents differ from what saelib wrote (seal mismatch or "
                           f"none); {advice}")
    if sae is not None and own.get("sae_digest") != sae_digest(sae):
        raise DamagedError(f"{path} is stale: it evaluates other weights (digest {own.get('sae_digest')}) than "
                           f"this SAE's ({sae_digest(sae)}); {advice}")
    return doc
