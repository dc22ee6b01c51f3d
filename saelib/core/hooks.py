"""TransformerLens hook names, parsed in one place.

A hook name is ``blocks.N.<point>`` for a point inside block N (e.g. ``blocks.6.hook_resid_pre``),
or a model-level point (``hook_embed``, ``ln_final.hook_normalized``). ``parse_hook`` is the only
function that reads the string; everything else (which block a hook is in, how deep a forward pass
must run, which residual streams come after a splice) is built on it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["HookName", "parse_hook", "hook_layer", "valid_hook_points", "check_hook_point", "stop_layer",
           "later_resid_hooks", "later_residual_streams", "RESIDUAL_POINTS"]

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")
_EMBEDDING = ("hook_embed", "hook_pos_embed", "hook_tokens")
RESIDUAL_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
"""Points whose activations live in the residual basis (an SAE there can be read by the unembedding)."""


@dataclass(frozen=True)
class HookName:
    """A parsed hook name."""

    name: str
    """The full name, e.g. ``blocks.6.hook_resid_pre``."""
    layer: int | None
    """Block index; ``None`` for embedding hooks, -1 for points after the last block (``ln_final``)."""
    point: str
    """The part after ``blocks.N.`` (the whole name outside blocks)."""

    @property
    def stream_index(self) -> int | None:
        """k such that this hook reads the input of block k (resid_post of block k-1 is resid_pre of
        block k); ``None`` unless it is a block's resid_pre or resid_post."""
        if self.layer is None or self.layer < 0 or self.point not in ("hook_resid_pre", "hook_resid_post"):
            return None
        return self.layer + (self.point == "hook_resid_post")

    @property
    def in_residual_basis(self) -> bool:
        return self.point in RESIDUAL_POINTS or self.point == "hook_embed"


def parse_hook(hook: str) -> HookName:
    """Split a hook name into its block index and point."""
    m = _BLOCK.match(hook)
    if m:
        return HookName(hook, int(m.group(1)), m.group(2))
    return HookName(hook, None if hook in _EMBEDDING else -1, hook)


def hook_layer(hook: str) -> int | None:
    """Block index a hook belongs to (``None`` for embedding hooks, -1 for ``ln_final``/unembed)."""
    return parse_hook(hook).layer


def valid_hook_points(model) -> list[str]:
    """All hook point names of a model, in forward order."""
    return list(model.hook_dict)


def _hook_templates(names: Iterable[str]) -> list[str]:
    # Compress "blocks.0.x" ... "blocks.29.x" into "blocks.{0..29}.x" so the error stays readable.
    per_point: dict[str, list[int]] = {}
    other: list[str] = []
    for n in names:
        h = parse_hook(n)
        if n.startswith("blocks."):
            per_point.setdefault(h.point, []).append(h.layer)
        else:
            other.append(n)
    out = [n for n in other if not n.startswith("ln_final")]
    out += [f"blocks.{{{min(layers)}..{max(layers)}}}.{point}" for point, layers in per_point.items()]
    return out + [n for n in other if n.startswith("ln_final")]


def check_hook_point(model, hook: str) -> str:
    """Return ``hook`` if the model has it; otherwise raise a ValueError listing the valid ones."""
    names = valid_hook_points(model)
    if hook in names:
        return hook
    close = difflib.get_close_matches(hook, names, n=3)
    hint = f" Did you mean {close}?" if close else ""
    common = [n for n in _hook_templates(names) if n.rsplit(".", 1)[-1] in (*RESIDUAL_POINTS, *_EMBEDDING[:2])]
    raise ValueError(
        f"{hook!r} is not a hook point of this model.{hint}\nCommon ones: {common}\n"
        f"All {len(names)} (valid_hook_points(model) lists them): {_hook_templates(names)}"
    )


def stop_layer(model, hooks: Iterable[str]) -> int | None:
    """The ``stop_at_layer`` that runs just deep enough to reach every hook (``None``: run it all)."""
    deepest = 0
    for h in hooks:
        check_hook_point(model, h)
        layer = hook_layer(h)
        if layer == -1:
            return None
        if layer is not None:
            deepest = max(deepest, layer + 1)
    return deepest if deepest < model.cfg.n_layers else None


def later_resid_hooks(model, hook: str) -> list[str]:
    """``blocks.k.hook_resid_pre`` for every block k after the SAE's layer: Braun et al.'s D."""
    start = parse_hook(hook).stream_index
    if start is None:
        raise ValueError(f"{hook!r} is not a residual-stream hook (blocks.N.hook_resid_pre/post)")
    return [f"blocks.{k}.hook_resid_pre" for k in range(start + 1, model.cfg.n_layers)]


def later_residual_streams(model, hook: str) -> list[str]:
    """Every residual stream after the SAE's layer: each later block's input, then the last block's
    output (what the unembedding reads). Where an e2e SAE's splice can move the model."""
    return [*later_resid_hooks(model, hook), f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
