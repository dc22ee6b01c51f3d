"""Neuronpedia's export layout, from the browser's gathered data (``FeatureData``).

Neuronpedia imports a source (one SAE of one model) from a folder ``MODEL/LAYER-SOURCESET/``
holding ``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl``, ``source.jsonl`` (one row each)
and batches ``features/batch-N.jsonl.gz`` (one ``Neuron`` row per feature) and
``activations/batch-N.jsonl.gz`` (one ``Activation`` row per example context). The field names
and types are those of its database (``apps/webapp/prisma/schema.prisma``'s ``Neuron`` and
``Activation`` models), which its importer (``apps/webapp/lib/db/import.ts``) fills column by
column from each JSON line; the layout is what its ``utils/neuronpedia-utils`` converters write.

What goes where: a feature's density is ``frac_nonzero``, its largest activation ``maxActApprox``,
its histogram ``freq_hist_data_bar_heights`` (counts) over ``freq_hist_data_bar_values`` (bin
centres), its promoted and suppressed tokens ``pos_str``/``pos_values`` and ``neg_str``/``neg_values``.
Each top example is an Activation with ``binMin`` -1 and ``binContains`` -1 (SAEDashboard's marking of
top examples), each quantile sample one with ``binMin``/``binMax`` its bin's edges and
``binContains`` the share of the feature's nonzero activations in that bin. Context values are the
feature's activations; positions without a scanned row (BOS, which SAEs never read) are 0.
"""

from __future__ import annotations

import gzip
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import torch

from saelib.browser.gather import FeatureData
from saelib.browser.pages import token_text
from saelib.core.hooks import parse_hook
from saelib.core.storage import atomic_dir, commit_dir

__all__ = ["export_neuronpedia", "source_id"]


def source_id(hook: str, source_set: str) -> str:
    """Neuronpedia's id of a source: its block index, a dash, the source set's name (e.g. ``3-saelib-topk``)."""
    layer = parse_hook(hook).layer
    if layer is None or layer < 0:
        raise ValueError(f"Neuronpedia names a source by its block index; {hook!r} is not inside a block")
    if not source_set or not all(c.isalnum() or c == "-" for c in source_set):
        raise ValueError(f"Neuronpedia source set names are letters, digits and dashes, got {source_set!r}")
    return f"{layer}-{source_set}"


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, allow_nan=False).encode() + b"\n" for r in rows)


def _activation(data: FeatureData, tokenizer, act_id: str, where: dict[str, str], feature: int, row: int,
                context: torch.Tensor, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
    """One example context as an Activation row; ``where``: its modelId, layer, creatorId and createdAt."""
    token_ids = data.context_ids(row)
    kept = [(t, 0.0 if math.isnan(v) else float(v)) for t, v in zip(token_ids, context.tolist()) if t is not None]
    values = [v for _, v in kept]
    top = max(range(len(values)), key=values.__getitem__)
    return where | {
        "id": act_id, "tokens": [token_text(tokenizer, t) for t, _ in kept], "index": str(feature),
        "maxValue": values[top], "maxValueTokenIndex": top, "minValue": min(values), "values": values,
        "binMin": bin_min, "binMax": bin_max, "binContains": bin_contains,
        # The example's own token: the first ``before`` positions that exist precede it.
        "qualifyingTokenIndex": sum(t is not None for t in token_ids[:data.before]),
        "dataSource": None, "dataIndex": None}


def _feature(data: FeatureData, tokenizer, feature: int, model_id: str, layer: str, source_set: str,
             creator_id: str, created: str) -> dict[str, Any]:
    n_bins = data.hist.shape[1]
    vmax = float(data.max[feature])
    row: dict[str, Any] = {
        "modelId": model_id, "layer": layer, "index": str(feature), "sourceSetName": source_set,
        "creatorId": creator_id, "createdAt": created, "maxActApprox": vmax, "hasVector": False,
        "frac_nonzero": float(data.density[feature]),
        "freq_hist_data_bar_heights": [float(c) for c in data.hist[feature].tolist()],
        "freq_hist_data_bar_values": [vmax * (b + 0.5) / n_bins for b in range(n_bins)],
        "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
    }
    if data.promoted is not None:
        row["pos_str"] = [token_text(tokenizer, t) for t in data.promoted[feature].tolist()]
        row["pos_values"] = [float(v) for v in data.promoted_logits[feature].tolist()]
        row["neg_str"] = [token_text(tokenizer, t) for t in data.suppressed[feature].tolist()]
        row["neg_values"] = [float(v) for v in data.suppressed_logits[feature].tolist()]
    return row


def _examples(data: FeatureData, feature: int) -> list[tuple[int, torch.Tensor, float, float, float]]:
    """(row, context, binMin, binMax, binContains) of every top example and quantile sample of a feature."""
    out = [(int(r), data.top_context[feature, j], -1.0, float(data.max[feature]), -1.0)
           for j, r in enumerate(data.top_rows[feature].tolist()) if r >= 0]
    count, n_q = int(data.count[feature]), data.sample_rows.shape[1]
    for q in range(n_q):
        size = (q + 1) * count // n_q - q * count // n_q  # the bins gather_features samples from
        edges = data.quantile_edges[feature]
        for s, r in enumerate(data.sample_rows[feature, q].tolist()):
            if r >= 0:
                out.append((int(r), data.sample_context[feature, q, s], float(edges[q]), float(edges[q + 1]),
                            size / count))
    return out


def export_neuronpedia(data: FeatureData, tokenizer, out: str | Path, *, model_id: str, hook: str, source_set: str,
                       creator_id: str = "saelib", creator_name: str = "saelib", dataset: str = "",
                       description: str = "", features_per_batch: int = 1024) -> Path:
    """Write one SAE's features (``data`` from ``gather_features``) in Neuronpedia's export layout under
    ``out/model_id/LAYER-source_set`` (replaced atomically) and return that folder.

    ``creator_id`` must name a user of the Neuronpedia instance that imports it (its importer does not
    create users); ``model_id`` must be the model's id there."""
    sid = source_id(hook, source_set)
    created = datetime.now(timezone.utc).isoformat()
    final = Path(out) / model_id / sid
    tmp = atomic_dir(final)
    windows = data.tokens.windows
    one = {
        "release.jsonl": {"name": source_set, "description": description or f"saelib SAE {data.name}",
                          "descriptionShort": description or data.name, "creatorName": creator_name,
                          "creatorNameShort": creator_name, "creatorId": creator_id, "visibility": "PUBLIC",
                          "urls": [], "createdAt": created},
        "model.jsonl": {"id": model_id, "instruct": False, "creatorId": creator_id, "displayNameShort": model_id,
                        "displayName": model_id, "createdAt": created, "updatedAt": created},
        "sourceset.jsonl": {"modelId": model_id, "name": source_set, "creatorId": creator_id, "hasDashboards": True,
                            "visibility": "PUBLIC", "description": description or data.name,
                            "creatorName": creator_name, "releaseName": source_set, "createdAt": created},
        "source.jsonl": {"id": sid, "modelId": model_id, "setName": source_set, "creatorId": creator_id,
                         "hasDashboards": True, "visibility": "PUBLIC", "dataset": dataset or None,
                         "num_prompts": int(windows.shape[0]), "num_tokens_in_prompt": int(windows.shape[1]),
                         "createdAt": created},
    }
    for name, row in one.items():
        (tmp / name).write_bytes(_jsonl([row]))
    (tmp / "features").mkdir()
    (tmp / "activations").mkdir()
    n_features = len(data.count)
    where = {"modelId": model_id, "layer": sid, "creatorId": creator_id, "createdAt": created}
    for batch, lo in enumerate(range(0, n_features, features_per_batch)):
        features, activations = [], []
        for f in range(lo, min(lo + features_per_batch, n_features)):
            features.append(_feature(data, tokenizer, f, model_id, sid, source_set, creator_id, created))
            for n, (row, context, b_min, b_max, b_contains) in enumerate(_examples(data, f)):
                activations.append(_activation(data, tokenizer, f"{model_id}-{sid}-{f}-{n}", where, f, row, context,
                                               b_min, b_max, b_contains))
        (tmp / "features" / f"batch-{batch}.jsonl.gz").write_bytes(gzip.compress(_jsonl(features), 5))
        (tmp / "activations" / f"batch-{batch}.jsonl.gz").write_bytes(gzip.compress(_jsonl(activations), 5))
    commit_dir(tmp, final)
    return final
