"""Name the activation module of a layer, so a kernel can say whether it computes it exactly."""

from __future__ import annotations

import torch
from torch import nn


def activation_name(module) -> str:
    """A canonical name: gelu, gelu_tanh, quick_gelu, relu, silu; else the class name."""
    name = type(module).__name__
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.SiLU):
        return "silu"
    if name == "GELUActivation":  # transformers.activations; may call a python gelu instead
        return "gelu" if getattr(module, "act", None) is nn.functional.gelu else "gelu_python"
    if name in ("NewGELUActivation", "PytorchGELUTanh", "GELUTanh", "FastGELUActivation"):
        return "gelu_tanh"
    if name == "QuickGELUActivation":
        return "quick_gelu"
    if name in ("SiLUActivation",):
        return "silu"
    if module is torch.nn.functional.gelu:
        return "gelu"
    if module is torch.nn.functional.relu:
        return "relu"
    return name
