"""Where a module lives, and moving data there: the one device rule of saelib.

Every function that takes a module (an SAE, a model) and data moves the data to the module's device
with ``to_device_of`` and hands results back on the CPU, so a chapter that trained its SAEs on a GPU
can pass CPU activation tables as it does on a CPU."""

from __future__ import annotations

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
