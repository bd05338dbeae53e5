"""Derived weights: every tensor bt_plugin computes from a fused layer's parameters and keeps beside
them, in one place, with its bytes.

- The fused QKV in-projection: a `[3E, E]` weight (and `[3E]` bias) whose slices *are* q/k/v's
  storage (the parameters are re-pointed into it): no byte beyond the parameters.
- The reduced-precision copy (`precision="bf16"`): the four matrix weights of a layer in bf16, held
  in oneDNN's prepacked layout where this torch has it (else plain bf16): the bytes of the bf16
  weights, instead of autocast casting every weight on every call.
- The prepacked copy (the opt-in `prepack=True`, `BT_PLUGIN_PREPACK=1`): the same four weights in
  their loaded dtype in oneDNN's prepacked layout, for a latency-bound service that trades memory for
  speed: a second copy of those weights.

All of it lives in the layer's `__dict__` (never in the state_dict), is made on first use, is made
again when a parameter changes (its storage, version, dtype or device), and is dropped by `revert()`,
pickling and deepcopy. `held_bytes` is what `explain()` and `doctor` report.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import NamedTuple

import torch
from torch import nn

from bt_plugin.kernels import linear
from bt_plugin.kernels.linear import Linears, PrepackedLinears, prepack_available
from bt_plugin.kernels.tensors import LayerTensors
from bt_plugin.spec import resolve_roles

_lock = threading.Lock()


class _Copy(NamedTuple):
    """A layer's derived copy: `tensors` (the kernel's view of it) and the bytes it `held`, made for
    `key` (its sources' storage, version, dtype and device); `made_from` is the LayerTensors it was
    made from, at `dtype`, when its source parameters were at `versions`."""

    key: tuple
    tensors: LayerTensors
    held: int
    made_from: LayerTensors
    dtype: torch.dtype
    versions: tuple
# the layer attribute that holds each kind of derived weight (all dropped together by `drop`)
_QKV, _COPIES = "_bt_qkv", "_bt_derived"
_MATMULS = (("in_proj_weight", "in_proj_bias"), ("out_proj_weight", "out_proj_bias"),
            ("linear1_weight", "linear1_bias"), ("linear2_weight", "linear2_bias"))


def _qkv_parts(layer, roles: dict | None = None) -> list[nn.Linear]:
    roles = roles if roles is not None else resolve_roles(layer, layer._bt_spec)
    return [roles["query"], roles["key"], roles["value"]]


def _is_view_of(fused: torch.Tensor | None, parts: list[torch.Tensor | None], rows: list[int]) -> bool:
    """Whether each present part is the slice of `fused` at its place (absent biases are zeros)."""
    if fused is None:
        return all(part is None for part in parts)
    offset = fused.data_ptr()
    step = fused.stride(0) * fused.element_size()
    for part, count in zip(parts, rows):
        if part is not None and (
            part.dtype != fused.dtype or part.device != fused.device
            or not part.is_contiguous() or part.data_ptr() != offset
        ):
            return False
        offset += count * step
    return True


def current_qkv(layer, roles: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The cached fused q/k/v if q/k/v still live in it; a stale cache is dropped (no double memory)."""
    cached = layer.__dict__.get(_QKV)
    if cached is None:
        return None
    try:
        parts = _qkv_parts(layer, roles)
    except AttributeError:  # the layer no longer matches its spec
        parts = []
    if parts and all(type(p) is nn.Linear for p in parts):
        rows = [p.out_features for p in parts]
        if _is_view_of(cached[0], [p.weight for p in parts], rows) and _is_view_of(
            cached[1], [p.bias for p in parts], rows
        ):
            return cached
    layer.__dict__.pop(_QKV, None)
    return None


def fused_qkv(layer, roles: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `[3E, E]` in-projection weight and `[3E]` bias, whose slices *are* q/k/v's storage.

    Rebuilt (and q/k/v re-pointed into it) whenever `.to()`, `.half()`, `load_state_dict(assign=True)`
    or anything else gave a projection new storage, so the kernel never sees stale weights. A
    projection without bias gets zeros in the fused bias (None when none has a bias).
    """
    cached = current_qkv(layer, roles)
    if cached is not None:
        return cached
    parts = _qkv_parts(layer, roles)
    with _lock, torch.inference_mode(False), torch.no_grad():
        weight = _concat_into_views([p.weight for p in parts], parts[0].weight)
        bias = None
        if any(p.bias is not None for p in parts):
            bias = _concat_into_views([p.bias for p in parts], weight, [p.out_features for p in parts])
        layer.__dict__[_QKV] = fused = (weight, bias)
    return fused


def _concat_into_views(params: list, like: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    pieces = [
        p.detach() if p is not None else like.new_zeros(count)
        for p, count in zip(params, rows or [p.shape[0] for p in params])
    ]
    fused = torch.cat(pieces)
    start = 0
    for param, piece in zip(params, pieces):
        if param is not None:
            param.data = fused[start:start + piece.shape[0]]  # same Parameter object, storage now shared
        start += piece.shape[0]
    return fused


def unfuse_qkv(layer) -> None:
    """Give q/k/v their own storage again (used by revert and pickling)."""
    if not layer._bt_spec.has_fused_layout:
        return
    try:
        parts = _qkv_parts(layer)
    except AttributeError:  # the layer no longer matches its spec: nothing was fused
        parts = []
    with torch.inference_mode(False), torch.no_grad():
        for module in parts:
            for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(param, torch.Tensor):
                    param.data = param.data.clone()
    layer.__dict__.pop(_QKV, None)


def wants_copy(layer, tensors: LayerTensors, dtype: torch.dtype) -> bool:
    """Whether a call computing in `dtype` runs on a derived copy of the matrix weights: a reduced
    precision the weights are not held in, or the prepacked opt-in (CPU, where oneDNN has it). Under
    the opt-in a layer whose feed-forward weight is smaller than `linear.ONEDNN_MIN_WEIGHT` keeps its
    plain weights: oneDNN's per-call cost outweighs what the prepacked layout saves there (hidden 32:
    0.75-0.88x of the plain route; `bench --quick`, bert-tiny small-batch, 2026-12-06)."""
    weight = tensors.out_proj_weight
    if dtype != weight.dtype:
        return True
    return (bool(layer.__dict__.get("_bt_prepack")) and weight.device.type == "cpu" and prepack_available()
            and tensors.linear1_weight.numel() >= linear.ONEDNN_MIN_WEIGHT)


def kernel_tensors(layer, tensors: LayerTensors, dtype: torch.dtype) -> LayerTensors:
    """`tensors` with the matrix multiplies on the derived copy a call computing in `dtype` uses (see
    `wants_copy`; else as they are). The copy is kept between calls and made again when a source
    parameter changes (storage, version, dtype, device); its layer scales follow the dtype too.

    A call with the very `tensors` object the copy was made from (a layer's plan, which its structure
    stamp keeps valid only while every parameter keeps its storage and dtype) checks the parameters'
    versions only: the check runs once per layer per call, where a short call's time is counted."""
    cached = layer.__dict__.get(_COPIES)
    versions = tuple([t._version for t in tensors.sources])
    if cached is not None and cached.made_from is tensors and cached.dtype is dtype and cached.versions == versions:
        return cached.tensors
    if not wants_copy(layer, tensors, dtype):
        return tensors
    sources = [getattr(tensors, name) for pair in _MATMULS for name in pair] + list(tensors.sources)
    key = (dtype,) + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    if cached is None or cached.key != key:
        with _lock, torch.inference_mode(False), torch.no_grad():
            derived, held = _copy(tensors, dtype)
    else:
        derived, held = cached.tensors, cached.held
    layer.__dict__[_COPIES] = _Copy(key, derived, held, tensors, dtype, versions)
    return derived


def _copy(tensors: LayerTensors, dtype: torch.dtype) -> tuple[LayerTensors, int]:
    """The derived tensors (the four weights and biases in `dtype`, prepacked where oneDNN can; the
    layer scales in `dtype`) and the bytes they add: every weight is a copy; a bias or scale only
    where its dtype changed (else it is the parameter itself)."""
    pairs = [(_cast(getattr(tensors, w), dtype), _cast(getattr(tensors, b), dtype)) for w, b in _MATMULS]
    cpu = tensors.out_proj_weight.device.type == "cpu"
    linears = (PrepackedLinears if cpu and prepack_available() else Linears)(
        *pairs, tensors.activation, tensors.activation_fn)
    scales = {"layer_scale1": _cast(tensors.layer_scale1, dtype), "layer_scale2": _cast(tensors.layer_scale2, dtype)}
    small = [t for pair in pairs for t in pair[1:]] + list(scales.values())
    held = sum(w.nbytes for w, _ in linears.pairs) + (
        0 if dtype == tensors.out_proj_weight.dtype else sum(t.nbytes for t in small if t is not None))
    return dataclasses.replace(tensors, linears=linears, **scales), held


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to(dtype)


def held_bytes(layer) -> int:
    """The bytes of derived weights `layer` holds beside its parameters now (the fused QKV views share
    the parameters' storage and count nothing)."""
    cached = layer.__dict__.get(_COPIES)
    return 0 if cached is None else cached.held


def drop(state: dict) -> None:
    """Forget every derived copy in a layer's `__dict__` (they are made again on first use)."""
    state.pop(_COPIES, None)
