"""Export to, and load from, SAELens's on-disk layout (cfg.json + sae_weights.safetensors).

SAELens computes ``z = (x - b_dec) @ W_enc + b_enc`` on raw activations. saelib scales x by s first,
so the export folds s into the weights, which reproduces saelib's outputs exactly:

    W_enc' = s * encoder.T,  b_dec' = b_dec / s,  W_dec' = decoder / s,  b_enc' = b_enc

Architectures: topk -> "topk" (with k); relu -> "standard"; feature_choice and mutual_choice ->
"jumprelu" with saelib's tracked inference thresholds (how these batch-level rules encode a single
token). The full saelib config is kept under ``metadata.saelib`` so ``load_saelens`` rebuilds the
exact saelib SAE; folders written by SAELens itself load too (standard, topk, jumprelu).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from saelib.core.allocation import get_rule
from saelib.core.checkpoints import CheckpointError, read_tensors
from saelib.core.sae import SAE, SAEConfig
from saelib.core.storage import atomic_dir, commit_dir, read_json, verify


def export_saelens(sae: SAE, folder: str | Path, model_name: str = "", hook_name: str = "",
                   context_size: int | None = None) -> Path:
    """Write ``sae`` in SAELens's layout to ``folder`` (atomically)."""
    folder = Path(folder)
    cfg = sae.cfg
    s = float(sae.input_scale)
    weights = {
        "W_enc": (sae.encoder.detach() * s).T.contiguous(),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": (sae.decoder.detach() / s).contiguous(),
        "b_dec": (sae.b_dec.detach() / s).contiguous(),
    }
    architecture = get_rule(cfg.rule).saelens_architecture
    saelens_cfg = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook_name, "context_size": context_size,
                     "saelib": {"config": cfg.to_dict(), "input_scale": s}},
    }
    if architecture == "topk":
        saelens_cfg["k"] = cfg.k
    if architecture == "jumprelu":
        # A feature never seen firing keeps an infinite threshold; safetensors stores inf fine, but
        # JSON-minded tools may not, so cap it far above any pre-activation.
        weights["threshold"] = torch.nan_to_num(sae.threshold.detach().clone(), posinf=1e30)
    tmp = atomic_dir(folder)
    (tmp / "cfg.json").write_text(json.dumps(saelens_cfg, indent=2))
    save_file(weights, str(tmp / "sae_weights.safetensors"))
    commit_dir(tmp, folder)
    return folder


def load_saelens(folder: str | Path) -> SAE:
    """Load an SAELens-layout folder as a saelib SAE (inference mode)."""
    folder = Path(folder)
    advice = f"delete {folder} and export it again"
    verify(folder, advice)  # folders exported by saelib carry checksums; others have none to check
    saelens_cfg = read_json(folder / "cfg.json", advice)
    w = read_tensors(folder / "sae_weights.safetensors", advice)
    ours = saelens_cfg.get("metadata", {}).get("saelib")
    architecture = saelens_cfg.get("architecture", "standard")
    if ours is not None:
        cfg, s = SAEConfig.from_dict(ours["config"]), float(ours["input_scale"])
    else:
        # A foreign JumpReLU SAE encodes by per-feature thresholds, as saelib's Feature Choice SAEs
        # do at inference, so it loads as one.
        rule = {"topk": "topk", "standard": "relu", "jumprelu": "feature_choice"}.get(architecture)
        if rule is None or saelens_cfg.get("normalize_activations", "none") != "none":
            raise CheckpointError(f"{folder}: cannot load SAELens architecture {architecture!r} with "
                                  f"normalize_activations={saelens_cfg.get('normalize_activations')!r}; "
                                  "supported: standard, topk, jumprelu without normalisation")
        cfg = SAEConfig(d_in=saelens_cfg["d_in"], d_sae=saelens_cfg["d_sae"], rule=rule,
                        k=int(saelens_cfg.get("k", 1)), normalize_input=False)
        s = 1.0
    if w["W_enc"].shape != (cfg.d_in, cfg.d_sae):
        raise CheckpointError(f"{folder}: W_enc has shape {list(w['W_enc'].shape)}, "
                              f"cfg.json says [{cfg.d_in}, {cfg.d_sae}]")
    sae = SAE(cfg)
    with torch.no_grad():
        sae.input_scale.fill_(s)
        sae.encoder.copy_(w["W_enc"].T / s)
        sae.b_enc.copy_(w["b_enc"])
        sae.decoder.copy_(w["W_dec"] * s)
        sae.b_dec.copy_(w["b_dec"] * s)
        if "threshold" in w:
            sae.threshold.copy_(torch.where(w["threshold"] >= 1e30, torch.inf, w["threshold"]))
    return sae.eval()
