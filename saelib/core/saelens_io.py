"""Export to, and load from, SAELens's on-disk layout (cfg.json, sae_weights.safetensors, sparsity.safetensors).

SAELens computes ``z = (x - b_dec) @ W_enc + b_enc`` on raw activations. saelib scales x by s first,
so the export folds s into the weights, which reproduces saelib's outputs exactly:

    W_enc' = s * encoder.T,  b_dec' = b_dec / s,  W_dec' = decoder / s,  b_enc' = b_enc

An SAE without a pre-encoder bias (``parametrisation="e2e_sae"``, s = 1) is written with
``apply_b_dec_to_input`` false, SAELens's name for the same forward.

Architectures: topk -> "topk" (with k); relu -> "standard"; feature_choice and mutual_choice ->
"jumprelu" with saelib's tracked inference thresholds (how these batch-level rules encode a single
token). The full saelib config is kept under ``metadata.saelib`` so ``load_saelens`` rebuilds the
exact saelib SAE; folders written by SAELens itself load too (standard, topk, jumprelu).

``cfg.json``'s ``metadata`` carries every key SAELens 6's loaders and tools read (``SAELENS_METADATA_KEYS``:
model, hook, context size, BOS handling, dataset, versions, ...). ``sparsity.safetensors`` holds
``sparsity`` = log10(feature density + 1e-10), as SAELens's trainer writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelib.core.allocation import get_rule
from saelib.core.checkpoints import CheckpointError, read_tensors
from saelib.core.sae import SAE, SAEConfig
from saelib.core.storage import atomic_dir, commit_dir, read_json, verify

SAELENS_METADATA_KEYS = (
    "model_name", "model_class_name", "hook_name", "hook_head_index", "hook_name_out", "hook_head_index_out",
    "hf_hook_name", "hf_hook_name_out", "model_from_pretrained_kwargs", "context_size", "prepend_bos",
    "exclude_special_tokens", "seqpos_slice", "sequence_separator_token", "disable_concat_sequences",
    "dataset_path", "neuronpedia_id", "sae_lens_version", "sae_lens_training_version",
)
"""SAELens 6's metadata keys: its loaders' LLM_METADATA_KEYS plus what its training runner records
(``model_class_name``, ``sequence_separator_token``, ``disable_concat_sequences``)."""

SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as ``sae_lens_version``: SAELens reads it to decide whether a cfg.json needs its pre-6.0
converter (which would drop the metadata SAELens does not know, saelib's included)."""

LOG_SPARSITY_EPS = 1e-10
"""SAELens's trainer writes log10(density + 1e-10), so a dead feature reads -10."""


def run_metadata(data: Mapping[str, Any]) -> dict[str, Any]:
    """SAELens metadata for SAEs trained on a ``saelib train`` run's ``data`` table (CacheSpec fields).

    saelib's windows start with BOS (``prepend_bos``), documents are joined by EOS
    (``sequence_separator_token``) and, with ``exclude_bos``, position 0 is dropped: SAELens's
    ``seqpos_slice`` (1, None). saelib never drops special tokens by id (``exclude_special_tokens``
    False). A synthetic run has no model: only what applies is filled."""
    if "model" not in data:
        return {"model_name": "synthetic" if "synthetic" in data else None}
    return {
        "model_name": data["model"], "model_class_name": "HookedTransformer", "hook_name": data.get("hook"),
        "hook_head_index": None, "context_size": data.get("context_size"), "prepend_bos": True,
        "exclude_special_tokens": False, "seqpos_slice": [1, None] if data.get("exclude_bos", True) else [None],
        "sequence_separator_token": "eos", "disable_concat_sequences": False, "dataset_path": data.get("corpus"),
    }


def saelens_config(sae: SAE, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json SAELens reads for ``sae``. ``metadata`` fills SAELENS_METADATA_KEYS (unknown keys are
    refused); keys not given are written as None, so a tool reading them learns they are unknown
    rather than getting SAELens's defaults."""
    metadata = dict(metadata or {})
    unknown = sorted(set(metadata) - set(SAELENS_METADATA_KEYS))
    if unknown:
        raise ValueError(f"unknown SAELens metadata keys {unknown}; valid: {list(SAELENS_METADATA_KEYS)}")
    cfg = sae.cfg
    architecture = get_rule(cfg.rule).saelens_architecture
    meta = {key: metadata.get(key) for key in SAELENS_METADATA_KEYS}
    meta["sae_lens_version"] = metadata.get("sae_lens_version") or SAELENS_FORMAT_VERSION
    meta["saelib"] = {"config": cfg.to_dict(), "input_scale": float(sae.input_scale)}
    out = {"architecture": architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": cfg.pre_encoder_bias, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": meta}
    if architecture == "topk":
        out["k"] = cfg.k
    return out


def log_sparsity(density: Tensor) -> Tensor:
    """SAELens's ``sparsity`` tensor: log10 of each feature's firing density (+1e-10)."""
    return torch.log10(density.detach().float().cpu() + LOG_SPARSITY_EPS)


def export_saelens(sae: SAE, folder: str | Path, metadata: Mapping[str, Any] | None = None,
                   density: Tensor | None = None) -> Path:
    """Write ``sae`` in SAELens's layout to ``folder`` (atomically).

    ``metadata``: SAELens metadata (``run_metadata`` of the run, or any SAELENS_METADATA_KEYS); an
    export without it records only the versions and leaves model, hook, context size and the rest
    None (SAELens's ``ActivationsStore.from_sae`` then refuses the SAE until they are set).
    ``density``: per-feature firing frequency for ``sparsity.safetensors``, e.g. an Evaluation's
    ``density`` on held-out tokens; default the SAE's running training statistics (``sae.density``)."""
    folder = Path(folder)
    s = float(sae.input_scale)
    cfg = saelens_config(sae, metadata)
    weights = {
        "W_enc": (sae.encoder.detach() * s).T.contiguous(),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": (sae.decoder.detach() / s).contiguous(),
        "b_dec": (sae.b_dec.detach() / s).contiguous(),
    }
    if cfg["architecture"] == "jumprelu":
        # A feature never seen firing keeps an infinite threshold; safetensors stores inf fine, but
        # JSON-minded tools may not, so cap it far above any pre-activation.
        weights["threshold"] = torch.nan_to_num(sae.threshold.detach().clone(), posinf=1e30)
    density = sae.density if density is None else density
    if density.shape != (sae.cfg.d_sae,):
        raise ValueError(f"density must have one entry per feature ({sae.cfg.d_sae}), got {list(density.shape)}")
    tmp = atomic_dir(folder)
    (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights, str(tmp / "sae_weights.safetensors"))
    save_file({"sparsity": log_sparsity(density)}, str(tmp / "sparsity.safetensors"))
    commit_dir(tmp, folder)
    return folder


@dataclass
class SAELensFolder:
    """An SAELens-layout folder read into saelib."""

    sae: SAE
    """The SAE in inference mode."""
    metadata: dict[str, Any]
    """cfg.json's metadata (every SAELENS_METADATA_KEYS entry present, None where the folder has none)."""
    log_sparsity: Tensor | None
    """sparsity.safetensors' log10 densities, if the folder has one."""

    def require(self, *keys: str) -> list[Any]:
        """The values of metadata ``keys``; a CheckpointError naming the first one that is missing."""
        for key in keys:
            if self.metadata.get(key) is None:
                raise CheckpointError(f"the SAELens folder's cfg.json has no metadata.{key}: set it there "
                                      f"(SAELens records it at training) or pass it on the command line")
        return [self.metadata[key] for key in keys]


def _read_cfg(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist or is not a folder")
    if not (folder / "cfg.json").exists():
        what = "a saelib SAE (config.json); load it with load_sae" if (folder / "config.json").exists() else \
            "an SAE folder"
        raise CheckpointError(f"{folder} is not an SAELens SAE folder (no cfg.json): it is {what}")
    cfg = read_json(folder / "cfg.json", f"delete {folder} and export it again")
    missing = [k for k in ("d_in", "d_sae") if k not in cfg] if isinstance(cfg, dict) else ["d_in", "d_sae"]
    if missing:
        raise CheckpointError(f"{folder / 'cfg.json'} is not an SAELens config: it lacks {', '.join(missing)}")
    return cfg


def read_saelens(folder: str | Path) -> SAELensFolder:
    """Read an SAELens-layout folder: one written by ``export_saelens`` (the exact saelib SAE comes
    back) or by SAELens itself (standard, topk and jumprelu SAEs without input normalisation)."""
    folder = Path(folder)
    advice = f"delete {folder} and export it again"
    saelens_cfg = _read_cfg(folder)
    verify(folder, advice)  # folders exported by saelib carry checksums; others have none to check
    w = read_tensors(folder / "sae_weights.safetensors", advice)
    metadata = dict(saelens_cfg.get("metadata") or {})
    ours = metadata.pop("saelib", None)
    architecture = saelens_cfg.get("architecture", "standard")
    if ours is not None:
        cfg, s = SAEConfig.from_dict(ours["config"]), float(ours["input_scale"])
    else:
        # A foreign JumpReLU SAE encodes by per-feature thresholds, as saelib's Feature Choice SAEs
        # do at inference, so it loads as one.
        rule = {"topk": "topk", "standard": "relu", "jumprelu": "feature_choice"}.get(architecture)
        if (rule is None or saelens_cfg.get("normalize_activations", "none") != "none"
                or saelens_cfg.get("rescale_acts_by_decoder_norm") or saelens_cfg.get("reshape_activations",
                                                                                      "none") != "none"):
            raise CheckpointError(f"{folder}: cannot load SAELens architecture {architecture!r} with "
                                  f"normalize_activations={saelens_cfg.get('normalize_activations')!r}; "
                                  "supported: standard, topk, jumprelu without normalisation, decoder-norm "
                                  "rescaling or hook_z reshaping")
        cfg = SAEConfig(d_in=saelens_cfg["d_in"], d_sae=saelens_cfg["d_sae"], rule=rule,
                        k=int(saelens_cfg.get("k", 1)), normalize_input=False)
        s = 1.0
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
                "b_dec": (cfg.d_in,)}
    bad = {k: list(w[k].shape) if k in w else "missing" for k, shape in expected.items()
           if k not in w or tuple(w[k].shape) != shape}
    if bad:
        raise CheckpointError(f"{folder}: sae_weights.safetensors does not match cfg.json's d_in={cfg.d_in}, "
                              f"d_sae={cfg.d_sae}: {bad}")
    b_enc = w["b_enc"].float()
    if not saelens_cfg.get("apply_b_dec_to_input", True) and cfg.pre_encoder_bias:
        # SAELens then encodes x @ W_enc + b_enc; saelib's parametrisation encodes (x - b_dec): fold
        # b_dec into b_enc (an e2e_sae SAE has no pre-encoder bias either, and loads as it is).
        b_enc = b_enc + w["b_dec"].float() @ w["W_enc"].float()
    sae = SAE(cfg)
    with torch.no_grad():
        sae.input_scale.fill_(s)
        sae.encoder.copy_(w["W_enc"].T / s)
        sae.b_enc.copy_(b_enc)
        sae.decoder.copy_(w["W_dec"] * s)
        sae.b_dec.copy_(w["b_dec"] * s)
        if "threshold" in w:
            sae.threshold.copy_(torch.where(w["threshold"] >= 1e30, torch.inf, w["threshold"]))
    sparsity = folder / "sparsity.safetensors"
    log_density = read_tensors(sparsity)["sparsity"] if sparsity.exists() else None
    return SAELensFolder(sae.eval(), {k: metadata.get(k) for k in SAELENS_METADATA_KEYS} | metadata, log_density)


def load_saelens(folder: str | Path) -> SAE:
    """Load an SAELens-layout folder as a saelib SAE (inference mode); ``read_saelens`` also gives its
    metadata and sparsity."""
    return read_saelens(folder).sae
