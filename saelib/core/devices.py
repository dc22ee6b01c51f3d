"""Where a module lives, and moving data there: the one device rule of saelib.

Every function that takes a module (an SAE, a model) and data moves the data to the module's device
with ``to_device_of`` and hands results back on the CPU, so a chapter that trained its SAEs on a GPU
can pass CPU activation tables as it does on a CPU."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for a module with neither.

    A model split over devices (TransformerLens ``n_devices > 1``) takes its input on the first, its
    embedding's, which is its first parameter."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device_of(x: Tensor | np.ndarray, module: nn.Module) -> Tensor:
    """``x`` as a tensor on ``module``'s device (no copy when it is there already)."""
    return torch.as_tensor(x).to(module_device(module))


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, which is what makes bfloat16
    faster than float32: a CUDA GPU with bfloat16 support, or a CPU with AVX-512 BF16 or AMX.
    Elsewhere PyTorch's bfloat16 products take a slow path (on an AVX2-only CPU, 2026-12-04: a
    4096 x 576 x 4608 product at 7 GFLOP/s in bfloat16 against 66 in float32)."""
    return _native_bfloat16(torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _native_bfloat16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def machine_precision(requested: str, device: str | torch.device = "cpu") -> str:
    """The precision to compute in when ``requested`` is a default rather than a choice: bfloat16
    only where ``device`` has it natively (``native_bfloat16``), else float32, which every device
    runs at full speed and which the book measured equal in quality (README, Speed)."""
    if requested == "bfloat16" and not native_bfloat16(device):
        return "float32"
    return requested
