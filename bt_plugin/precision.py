"""The precision converted encoder layers compute in: the choice, the per-device table behind
`auto`, and what the CPU computes natively.

`precision="bf16"` runs each converted encoder layer's inference call under
`torch.autocast(device, dtype=torch.bfloat16)`: matrix multiplies in bf16, what autocast keeps in
fp32 (layer norms, softmax on CUDA, the residual stream) in fp32, and the layer's output handed
back in the dtype it came in. The weights stay as loaded (fp32 parameters, the same state_dict);
autocast casts each one as the layer uses it. Embeddings, heads and everything outside the encoder
layers run as loaded. Training calls and calls that record gradients run in the model's own
precision. `fp32` (the default) changes nothing; `auto` picks bf16 only where the CPU computes bf16
natively (`AUTO_PRECISION`).

Under a user's own `torch.autocast`, layers compute what stock computes under it, whatever the
choice here.
"""

from __future__ import annotations

import functools
import platform
from contextlib import nullcontext

import torch

PRECISION_CHOICES = ("fp32", "bf16", "auto")
DTYPES = {"bf16": torch.bfloat16}
# CPU features that compute a precision natively, by the name /proc/cpuinfo gives them (x86 flags;
# aarch64 "Features"), and the name a reader knows them by.
CPU_FEATURES = {
    "amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16",
    "amx_int8": "AMX-INT8", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "bf16": "BF16 (Arm)",
}
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16")
# What "auto" picks per device type where that device computes it natively (a CPU: NATIVE_BF16;
# measured by `python -m bt_plugin bench --precisions`, see README); fp32 elsewhere, CUDA and
# unlisted devices included until a measurement says otherwise.
AUTO_PRECISION = {"cpu": "bf16", "cuda": "fp32"}
# ... and per call, where the device table says bf16: `auto` computes a call in bf16 only where bf16
# is the faster (measured with `python -m bt_plugin bench --workloads query,document,small-batch
# --precisions bf16`, per row). A fused layer computes on its prepacked bf16 copy, which pays from
# this width on (the casts of a narrower layer's tokens cost more than its multiplies save: hidden
# 32, 0.6x of fp32); a layer that runs its own code under autocast casts each weight on every call,
# which pays from this many tokens a call on (T5-base: 0.46x of fp32 at 1 token, 1.5x at 150).
AUTO_BF16_MIN_WIDTH = 256
AUTO_BF16_MIN_TOKENS = 64


def check_precision_name(name: str) -> str:
    """Return `name` if it is a valid precision choice, else raise a ValueError listing them."""
    if name not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {name!r}; valid precisions: {', '.join(PRECISION_CHOICES)}")
    return name


def check_prepack(prepack) -> bool:
    """Return `prepack` if it is True or False (the opt-in for a prepacked copy of the matrix
    weights, see bt_plugin.dispatch.derived), else raise a ValueError naming the valid values."""
    if prepack is not True and prepack is not False:
        raise ValueError(f"prepack must be True or False, got {prepack!r}")
    return prepack


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux `/proc/cpuinfo`); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_precisions(flags: frozenset[str] | None = None) -> list[str]:
    """The reduced precisions this CPU computes natively, e.g. `['AMX-BF16', 'AVX512-BF16']`."""
    flags = cpu_flags() if flags is None else flags
    return [label for flag, label in CPU_FEATURES.items() if flag in flags]


def auto_choice(device_type: str = "cpu", flags: frozenset[str] | None = None) -> tuple[str, str]:
    """`(precision, why)`: what `auto` computes in on this device, and the reason."""
    if AUTO_PRECISION.get(device_type, "fp32") == "fp32":
        return "fp32", f"auto stays fp32 on {device_type} (only CPUs with native bf16 get bf16)"
    flags = cpu_flags() if flags is None else flags
    native = [CPU_FEATURES[flag] for flag in NATIVE_BF16 if flag in flags]
    if native:
        return "bf16", f"the CPU computes bf16 natively ({', '.join(native)})"
    return "fp32", (f"the CPU ({platform.machine() or 'unknown'}) has no native bf16 (no AMX-BF16, "
                    "AVX512-BF16 or Arm BF16): bf16 would be emulated, slower than fp32")


def resolve_precision(name: str, device_type: str = "cpu") -> str:
    """The concrete precision (`fp32` or `bf16`) of a choice on a device."""
    check_precision_name(name)
    return auto_choice(device_type)[0] if name == "auto" else name


def compute_dtype(name: str | None, hidden, layer, own_code=lambda: False) -> torch.dtype | None:
    """The dtype one layer call computes in under precision `name`, or None (as loaded): only
    inference calls (eval mode, no gradient recorded) on float32 hidden states, outside a user's own
    autocast; under `auto`, only calls where bf16 pays (`auto_pays`; `own_code()`: whether the layer
    runs its own code under autocast rather than a fused kernel, asked under `auto` only)."""
    if not name or name == "fp32" or not isinstance(hidden, torch.Tensor) or hidden.dtype != torch.float32:
        return None
    device = hidden.device.type
    if layer.training or torch.is_autocast_enabled(device):
        return None
    if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return None
    dtype = DTYPES.get(resolve_precision(name, device))
    if dtype is not None and name == "auto" and not auto_pays(hidden, own_code()):
        return None
    return dtype


def auto_pays(hidden: torch.Tensor, own_code: bool) -> bool:
    """Whether `auto` computes this call in bf16: a fused layer from AUTO_BF16_MIN_WIDTH hidden
    features, a layer running its own code from AUTO_BF16_MIN_TOKENS tokens (padded positions
    included: the shape is what the call costs before its padding is removed)."""
    if own_code:
        return hidden.numel() // max(hidden.size(-1), 1) >= AUTO_BF16_MIN_TOKENS
    return hidden.size(-1) >= AUTO_BF16_MIN_WIDTH


def auto_rule(device_type: str = "cpu") -> str:
    """What `auto` computes in on this device, per call, in words (for `doctor`)."""
    choice, why = auto_choice(device_type)
    if choice == "fp32":
        return f"fp32 ({why})"
    return (f"bf16 ({why}) for fused layers of hidden size >= {AUTO_BF16_MIN_WIDTH} and for layers running their "
            f"own code on calls of >= {AUTO_BF16_MIN_TOKENS} tokens; fp32 below, where bf16 would be slower")


def computing_in(dtype: torch.dtype | None, device_type: str):
    """The autocast context for `dtype` (a no-op context for None)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


_SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def precision_label(hidden) -> str | None:
    """What a layer call with these hidden states computes in: `bf16 (autocast)` or `fp32`."""
    if not isinstance(hidden, torch.Tensor):
        return None
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return f"{short_name(torch.get_autocast_dtype(device))} (autocast)"
    return short_name(hidden.dtype)


def short_name(dtype: torch.dtype) -> str:
    """`bf16`, `fp16`, `fp32`, or the dtype's own name."""
    name = _SHORT_NAMES.get(dtype)
    return name if name is not None else str(dtype).replace("torch.", "")
