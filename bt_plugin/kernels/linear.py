"""The float32 matrix multiplies of the packed kernel's linears, and the per-CPU table that picks
their library.

`F.linear` on a CPU calls MKL's sgemm. On AMD EPYC CPUs oneDNN's inner product (the library torch
uses for its bf16 and mkldnn ops) is faster on the same plain weights, with no copy and no
reordering: measured on a 2-core AVX512 EPYC, 1.1x-2x per linear at 14 to 2048 tokens and 10.4 ->
8.5 ms for a 14-token all-MiniLM-L6-v2 query (`python -m bt_plugin bench --workloads query`).
Elsewhere (Intel Xeon, where MKL is tuned) `F.linear` stays until a measurement says otherwise;
the choice is bt_plugin.kernels.device_table.LINEAR_BY_CPU_VENDOR, beside the other per-device choices.
The two libraries sum in different orders: outputs differ from stock's by float32 rounding
(about 2e-6 on MiniLM), within the 1e-5 the parity tests hold every kernel to.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bt_plugin.kernels import device_table, torch_ops


LINEAR_LIBRARIES = ("torch", "onednn")


@functools.cache
def cpu_vendor() -> str | None:
    """The CPU's vendor_id (`GenuineIntel`, `AuthenticAMD`), or None where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")), None)
    except OSError:
        return None


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (bt_plugin.kernels.torch_ops)."""
    return torch_ops.available(torch_ops.LINEAR_POINTWISE)


def linear_library() -> str:
    """The library this machine's float32 CPU linears use (bt_plugin.kernels.device_table.LINEAR_BY_CPU_VENDOR,
    where this torch build has it)."""
    choice = device_table.LINEAR_BY_CPU_VENDOR.get(cpu_vendor() or "", "torch")
    return choice if choice != "onednn" or onednn_available() else "torch"


# oneDNN's call costs about 15-20 us more than MKL's before any arithmetic (measured on the same
# EPYC, 1 and 2 threads: hidden-32 linears took 17-30 us through oneDNN, 3-8 us through MKL), so it
# takes only the linears whose work repays that: a large weight (all-MiniLM-L6-v2's QKV and feed
# forward, faster at every token count) or a large product (its 384 x 384 output projection from
# 64 tokens on, where it is 1.2x faster; 0.6-0.8x below).
ONEDNN_MIN_WEIGHT, ONEDNN_MIN_FLOPS = 256 * 1024, 16e6


def _float32_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the call is plain float32 CPU inference on `[T, E]` tokens (no autocast, no grad):
    the calls `linear` may route other than through `F.linear` itself."""
    return (x.dtype is torch.float32 and weight.dtype is torch.float32 and x.dim() == 2 and x.device.type == "cpu"
            and (bias is None or bias.dtype is torch.float32)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def _onednn_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (weight.numel() >= ONEDNN_MIN_WEIGHT or 2 * x.shape[0] * weight.numel() >= ONEDNN_MIN_FLOPS) \
        and linear_library() == "onednn"


def library_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The library `linear` calls for these operands: "onednn" where linear_library() says so, the
    linear is large enough (ONEDNN_MIN_WEIGHT, ONEDNN_MIN_FLOPS) and the call is plain float32 CPU
    inference on `[T, E]` tokens (no autocast, no grad); else "torch"."""
    return "onednn" if _float32_inference(x, weight, bias) and _onednn_takes(x, weight) else "torch"


# MKL's sgemm (`F.linear` on a CPU) takes a slow path for 3 to 15 rows times a large weight: its
# time grows in steps of two rows (a 3072 x 768 weight: 180 us at 1-2 rows, 700 us at 10-12, 580 us
# at 16, where it changes paths; 2 threads, Intel Xeon with AMX). The same product cut into pieces of
# the weight's output rows, each about SPLIT_PIECE elements, runs 0.74-0.89x of the one call within a
# layer stack at 4 to 12 rows (12 layers of hidden 768; 8 of hidden 1024: 0.74-0.83x); it is no
# faster at 1 row or from 16 rows on, nor for weights below SPLIT_MIN_WEIGHT (hidden 384: 1.1-1.3x
# slower). Every output element is the same dot product. One query, bert-base, 2 threads:
# 1.01x -> 1.10x of stock (`bench --shapes bert-base --workloads query`). The threshold, measured on
# 16 distinct weights in turn (as a stack reads them), 2 threads: 0.89-1.45x of one call at 0.9M-1.2M
# elements (512 x 2048, 768 x 1536, 768 x 1152: slower at 6 rows), 0.65-0.93x at 1.3M-2.4M (1.00x at
# most at 6 rows): the cliff in MKL's time lies between (a 2048 x 512 weight 158 us, 4096 x 512 701 us).
SPLIT_ROWS, SPLIT_MIN_WEIGHT, SPLIT_PIECE = (4, 15), 1_300_000, 589_824


def splits(rows: int, weight: torch.Tensor) -> bool:
    """Whether `linear` computes `rows` tokens times this float32 weight in pieces (SPLIT_ROWS,
    SPLIT_MIN_WEIGHT) when MKL multiplies it."""
    return SPLIT_ROWS[0] <= rows <= SPLIT_ROWS[1] and weight.numel() >= SPLIT_MIN_WEIGHT \
        and weight.dtype is torch.float32 and weight.device.type == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for the packed `[T, E]` tokens, through the library `library_for`
    picks; a few tokens times a large weight through MKL in pieces of its output rows (`splits`)."""
    if _float32_inference(x, weight, bias):
        if _onednn_takes(x, weight):
            return torch_ops.lookup(torch_ops.LINEAR_POINTWISE)(x, weight, bias, "none", [], "")
        if splits(x.shape[0], weight):
            return in_pieces(x, weight, bias)
    return F.linear(x, weight, bias)


def in_pieces(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for `[T, E]` tokens, computed in pieces of about SPLIT_PIECE
    elements of the weight's output rows (the same dot products)."""
    pieces = weight.split(-(-weight.shape[0] // max(1, round(weight.numel() / SPLIT_PIECE))))
    parts = bias.split(pieces[0].shape[0]) if bias is not None else [None] * len(pieces)
    return torch.cat([F.linear(x, piece, part) for piece, part in zip(pieces, parts)], dim=1)


def few_rows_in_pieces(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` in pieces where MKL would multiply the rows of any-shaped `x` on
    its few-row slow path (`splits`, plain float32 CPU inference), else None: the caller runs
    `F.linear`. Callers test the row count against SPLIT_ROWS first (the reshape is for those)."""
    rows = x.numel() // weight.shape[1]
    tokens = x.reshape(rows, weight.shape[1])
    if not (_float32_inference(tokens, weight, bias) and splits(rows, weight)) or _onednn_takes(tokens, weight):
        return None
    return in_pieces(tokens, weight, bias).view(*x.shape[:-1], weight.shape[0])


PREPACK_OPS = (torch_ops.LINEAR_POINTWISE, torch_ops.LINEAR_POINTWISE_ADD, torch_ops.REORDER_LINEAR_WEIGHT)


def prepack_available() -> bool:
    """Whether this torch build can hold a weight in oneDNN's prepacked layout and multiply by it
    (bt_plugin.kernels.torch_ops says why not)."""
    return torch_ops.available(*PREPACK_OPS)


# The activations oneDNN computes as a post-op of the matrix multiply, as (attr, scalars, algorithm):
# the same functions as torch's (exact gelu is erf-based; tanh gelu is transformers' gelu_new), so
# the output differs from the separate op by float rounding only (tests/test_prepacked.py).
FUSED_ACTIVATIONS = {"gelu": ("gelu", [], "none"), "gelu_tanh": ("gelu", [], "tanh"), "relu": ("relu", [], "")}


class Linears:
    """One encoder layer's four matrix multiplies on its plain weights (the parameters themselves):
    the QKV in-projection, the out-projection and the feed-forward's two linears, each a
    `(weight, bias)` pair; `up` applies the layer's activation, `out` and `down` add the residual."""

    prepacked = False

    def __init__(self, qkv, out, up, down, activation: str, activation_fn):
        self.pairs = (qkv, out, up, down)
        self.activation, self.activation_fn = activation, activation_fn

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, *self.pairs[0])

    def out(self, x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return _scaled_residual(linear(x, *self.pairs[1]), residual, scale)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_fn(linear(x, *self.pairs[2]))

    def down(self, x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return _scaled_residual(linear(x, *self.pairs[3]), residual, scale)


def _scaled_residual(branch: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return residual + (branch if scale is None else branch * scale)


class PrepackedLinears(Linears):
    """The same four matrix multiplies on weights held in oneDNN's prepacked layout (made once, for
    every row count: no reorder per call), with the activation and the residual add fused into the
    multiply as oneDNN post-ops where oneDNN computes them (FUSED_ACTIVATIONS; a residual unless a
    layer scale sits between). The weights are a copy beside the parameters
    (bt_plugin.dispatch.derived makes, reports and drops it). The two operators are looked up once,
    when the copy is made: each multiply calls them directly (a short call counts every step)."""

    prepacked = True

    def __init__(self, qkv, out, up, down, activation: str, activation_fn):
        reorder = torch_ops.lookup(torch_ops.REORDER_LINEAR_WEIGHT)
        packed = [(reorder(w.detach()), None if b is None else b.detach().to(w.dtype))
                  for w, b in (qkv, out, up, down)]
        super().__init__(*packed, activation, activation_fn)
        self.post_op = FUSED_ACTIVATIONS.get(activation)
        self._multiply = torch_ops.lookup(torch_ops.LINEAR_POINTWISE)
        self._multiply_add = torch_ops.lookup(torch_ops.LINEAR_POINTWISE_ADD)

    def _plus(self, x: torch.Tensor, pair, residual: torch.Tensor, scale) -> torch.Tensor:
        if scale is not None:
            return _scaled_residual(self._multiply(x, pair[0], pair[1], "none", [], ""), residual, scale)
        return self._multiply_add(x, residual, pair[0], pair[1], "add")

    def qkv(self, x):
        weight, bias = self.pairs[0]
        return self._multiply(x, weight, bias, "none", [], "")

    def out(self, x, residual, scale=None):
        return self._plus(x, self.pairs[1], residual, scale)

    def up(self, x):
        weight, bias = self.pairs[2]
        if self.post_op is not None:
            return self._multiply(x, weight, bias, *self.post_op)
        return self.activation_fn(self._multiply(x, weight, bias, "none", [], ""))

    def down(self, x, residual, scale=None):
        return self._plus(x, self.pairs[3], residual, scale)
