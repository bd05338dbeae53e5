"""The compute kernels behind a fused layer, one module each, and the per-device table that picks one.

- `fastpath.py`: PyTorch's fused encoder-layer kernel on nested tensors (BetterTransformer's);
- `packed.py`: padding removed once, every dense op on the `[T, E]` matrix of real tokens;
- `layercode.py`: the layer's own code on the packed tokens (rotary, gated, adapters, quantized);
- `binned.py`: the layer's own code on bins of whole sequences (relative-position layers);
- `attention.py`: the per-sequence attention those two hand to transformers' attention lookup;
- `tensors.py`: what the fused kernels take (`LayerTensors`);
- `linear.py`: the packed kernel's float32 CPU linears, through MKL (`F.linear`) or oneDNN;
- `device_table.py`: the per-device choices (which kernel `auto` picks, which linear library);
- `torch_ops.py`: every private torch operator the kernels call, looked up and tried once, with a
  reason when the running torch lacks one (the kernel that needs it is then off).

Every kernel has one interface: `pack`, `layer`, `unpack`. A stack packs once at its first layer
and unpacks once after its last (see bt_plugin/dispatch/layer.py), so the `pack`/`unpack` cost is
paid once per forward, not per layer.
"""

from __future__ import annotations

from bt_plugin.kernels import torch_ops
from bt_plugin.kernels.device_table import AUTO_KERNEL, AUTO_KERNEL_UNDER_AUTOCAST, LINEAR_BY_CPU_VENDOR  # noqa: F401
from bt_plugin.kernels.fastpath import FastpathKernel
from bt_plugin.kernels.layercode import LAYER_CODE
from bt_plugin.kernels.packed import PackedKernel
from bt_plugin.kernels.tensors import LayerTensors  # noqa: F401  (what every kernel takes)

# `layercode` and `binned` also serve, on any choice, the layers a fused kernel cannot compute
# (see bt_plugin/dispatch/layer.py); `binned` is not a choice of its own.
KERNELS = {"fastpath": FastpathKernel(), "packed": PackedKernel(), "layercode": LAYER_CODE}
KERNEL_CHOICES = ("auto", *KERNELS)


def check_kernel_name(name: str) -> str:
    """Return `name` if it is a valid kernel choice, else raise a ValueError listing them."""
    if name not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel {name!r}; valid kernels: {', '.join(KERNEL_CHOICES)}")
    return name


def resolve_kernel_name(name: str, device_type: str, autocast: bool = False) -> str:
    """The concrete kernel for a choice on a device (`auto` looks up AUTO_KERNEL, or
    AUTO_KERNEL_UNDER_AUTOCAST while autocast is enabled there; `packed` where the running torch
    lacks a private operator the table's pick calls, see bt_plugin.kernels.torch_ops)."""
    check_kernel_name(name)
    if name != "auto":
        return name
    pick = (AUTO_KERNEL_UNDER_AUTOCAST if autocast else AUTO_KERNEL).get(device_type, "packed")
    return pick if torch_ops.available(*getattr(KERNELS[pick], "private_ops", ())) else "packed"


def get_kernel(name: str, device_type: str = "cpu", autocast: bool = False):
    """The kernel for a choice (`auto` resolved for `device_type`, and for autocast)."""
    return KERNELS[resolve_kernel_name(name, device_type, autocast)]
