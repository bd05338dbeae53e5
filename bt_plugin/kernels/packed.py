"""`packed`: padding removed into a `[T, E]` matrix of real tokens; every linear, layer norm,
activation and residual runs on it (one fused QKV matmul); attention runs per sequence on exactly
its real tokens (or on a compact padded view with a key-padding mask when padded rows are kept)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bt_plugin.kernels.fastpath import FastpathKernel
from bt_plugin.kernels import linear
from bt_plugin.kernels.linear import Linears
from bt_plugin.kernels.tensors import LayerTensors, dtype_reason


@dataclass
class PackState:
    """Where the `T` real tokens of a `(B, L)` batch live.

    `rows` are their flat positions in `B * L` (row-major; None when nothing is padded). Each
    sequence's real tokens are contiguous in the packed matrix: `segments` lists `(start, count)`
    per non-empty row, so attention runs per sequence on exactly its real tokens.
    """

    batch: int
    length: int
    segments: list[tuple[int, int]]
    rows: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None  # (B, 1, 1, L): every row kept, padded keys masked
    keep: torch.Tensor | None = None  # (B, L) real tokens, when padding was removed
    score_bias: torch.Tensor | None = None  # the layer's additive score bias these masks came from
    segment_masks: list[torch.Tensor] | None = None  # per segment: (1, H, n, n) bias among its tokens
    batched_mask: torch.Tensor | None = None  # the same, stacked, when every segment has one length
    dtype: torch.dtype | None = None  # the hidden states' dtype, restored by unpack (the carrier may be another)


class PackedKernel:
    """Padding removed once; every dense op on the `[T, E]` matrix of real tokens."""

    name = "packed"
    keeps_padded_rows = True
    right_padded_only = False
    dtypes = {
        "cpu": (torch.float32, torch.bfloat16, torch.float16),
        "cuda": (torch.float32, torch.bfloat16, torch.float16),
    }

    def static_reason(self, *, activation: str, num_heads: int, norm1_eps: float, norm2_eps: float,
                      has_biases: bool, plain_residuals: bool = True, score_bias: bool = False) -> str | None:
        """Packed computes any elementwise activation, head count, eps, missing bias, layer
        scale and additive score bias exactly."""
        return None

    def input_reason(self, hidden: torch.Tensor) -> str | None:
        return dtype_reason(self.name, self.dtypes, hidden)

    def pack(self, hidden: torch.Tensor, keep: torch.Tensor | None, keep_padded_rows: bool = False):
        """`(carrier, state)`: the `[T, E]` real tokens (all `B * L` rows when `keep` is None).

        With `keep_padded_rows` every position is kept and computed as stock computes it (padded
        queries attend to the real keys): for models that read padded positions.
        """
        batch, length, embed = hidden.shape
        flat = hidden.reshape(batch * length, embed)
        if keep is None or keep_padded_rows:
            key_mask = None if keep is None else keep[:, None, None, :]
            return flat, PackState(batch, length, [(row * length, length) for row in range(batch)], key_mask=key_mask,
                                   dtype=hidden.dtype)
        counts = keep.sum(dim=1).tolist()
        starts = [0]
        for count in counts[:-1]:
            starts.append(starts[-1] + count)
        segments = [(start, count) for start, count in zip(starts, counts) if count]
        rows = keep.reshape(-1).nonzero().squeeze(1)
        return flat.index_select(0, rows), PackState(batch, length, segments, rows, keep=keep, dtype=hidden.dtype)

    @staticmethod
    def with_score_bias(state: PackState, bias: torch.Tensor) -> None:
        """Attach a layer's additive `(B or 1, H, L, L)` score bias (MPNet's relative positions):
        each sequence gets the block among its real tokens (its padded keys masked when kept)."""
        state.score_bias = bias
        full = bias.expand(state.batch, bias.shape[1], state.length, state.length)
        if state.rows is None:  # every row kept (nothing padded, or padded rows computed as stock)
            if state.key_mask is not None:
                full = full.masked_fill(~state.key_mask, torch.finfo(full.dtype).min)
            state.segment_masks = list(full.split(1))
            state.batched_mask = full
            return
        state.segment_masks = []
        for row in range(state.batch):
            real = state.keep[row].nonzero().squeeze(1)
            if real.numel():
                state.segment_masks.append(full[row:row + 1].index_select(2, real).index_select(3, real))
        counts = {count for _, count in state.segments}
        state.batched_mask = torch.cat(state.segment_masks) if len(counts) == 1 else None

    def unpack(self, carrier: torch.Tensor, state: PackState) -> torch.Tensor:
        """Restore `(B, L, E)` in the dtype the hidden states came in; padded positions are zeros."""
        embed = carrier.size(-1)
        if state.dtype is not None and carrier.dtype != state.dtype:
            carrier = carrier.to(state.dtype)
        if state.rows is None:
            return carrier.view(state.batch, state.length, embed)
        out = carrier.new_zeros(state.batch * state.length, embed)
        return out.index_copy_(0, state.rows, carrier).view(state.batch, state.length, embed)

    def layer(self, x: torch.Tensor, t: LayerTensors, state: PackState) -> torch.Tensor:
        """One encoder layer (post- or pre-layer-norm) on the packed `[T, E]` tokens: the matrix
        multiplies through `t.linears` (plain or prepacked weights, which fuse the activation and the
        residual adds where they can), attention per sequence, layer norms."""
        mm = t.linears or plain_linears(t)
        if t.one_call and not mm.prepacked and torch.backends.mha.get_fastpath_enabled() \
                and not torch.is_autocast_enabled(x.device.type) and not linear.splits(x.shape[0], t.linear1_weight):
            dense = _dense(x, state)
            if dense is not None:  # the whole layer in one call of torch's fused kernel (fastpath's)
                return _FUSED_LAYER.layer(x.view(*dense, t.embed_dim), t).view(-1, t.embed_dim)
        shape = (t.embed_dim,)
        norm = torch.layer_norm  # F.layer_norm's own body, without its Python frame
        if t.norm_first:
            normed = norm(x, shape, t.norm1_weight, t.norm1_bias, t.norm1_eps)
            x = mm.out(_attend(mm.qkv(normed), t, state), x, t.layer_scale1)
            normed = norm(x, shape, t.norm2_weight, t.norm2_bias, t.norm2_eps)
            return mm.down(mm.up(normed), x, t.layer_scale2)
        x = norm(mm.out(_attend(mm.qkv(x), t, state), x, t.layer_scale1), shape, t.norm1_weight, t.norm1_bias, t.norm1_eps)
        return norm(mm.down(mm.up(x), x, t.layer_scale2), shape, t.norm2_weight, t.norm2_bias, t.norm2_eps)


# Where nothing is padded, the layer runs as one call of torch's fused encoder-layer kernel on the dense
# view (`t.one_call`: fastpath's static rule says it computes the layer exactly): one C++ call instead of
# a dozen Python-dispatched ops, whose per-op cost outweighs the arithmetic on a short sequence.
_FUSED_LAYER = FastpathKernel()


def _dense(x: torch.Tensor, state: PackState) -> tuple[int, int] | None:
    """`(sequences, length)` when the packed tokens are sequences of one length with no mask among
    them (nothing padded, or a single sequence): a dense `(sequences, length, E)` view."""
    if state.key_mask is not None or state.score_bias is not None or not state.segments:
        return None
    length = state.segments[0][1]
    if any(count != length for _, count in state.segments) or x.dtype != torch.float32:
        return None
    return len(state.segments), length


def plain_linears(t: LayerTensors) -> Linears:
    """The layer's matrix multiplies on its own (plain) weights."""
    return Linears((t.in_proj_weight, t.in_proj_bias), (t.out_proj_weight, t.out_proj_bias),
                   (t.linear1_weight, t.linear1_bias), (t.linear2_weight, t.linear2_bias),
                   t.activation, t.activation_fn)


def _attend(qkv: torch.Tensor, t: LayerTensors, state: PackState) -> torch.Tensor:
    """Self-attention of each sequence over exactly its real tokens, from the packed QKV rows:
    `[T, E]`, before the out-projection.

    One SDPA call per sequence on a slice of the packed QKV: no padded query, key or value is
    ever computed, and no mask is needed (small batches: one masked call, `_padded_is_cheaper`).
    """
    counts = {count for _, count in state.segments}
    if not counts:  # no row has a real token: nothing to attend
        return qkv.new_zeros(0, t.embed_dim)
    if len(counts) == 1:  # equal lengths (e.g. nothing padded): one batched call
        mask = state.batched_mask if state.score_bias is not None else state.key_mask
        return _sdpa(qkv, len(state.segments), counts.pop(), t, mask)
    if state.score_bias is None and _padded_is_cheaper(state):
        return _padded_sdpa(qkv, state, t)
    masks = state.segment_masks or [None] * len(state.segments)
    return torch.cat([_sdpa(qkv[start:start + count], 1, count, t, mask)
                      for (start, count), mask in zip(state.segments, masks)])


# One attention call costs about as much fixed work as this many extra score entries (query x key
# pairs, each a head-dim dot product per head): below it, padding a small batch's keys for one masked
# call beats one call per sequence (measured on 2-core AVX2 and AMX CPUs: a call is ~15-25 us).
CALL_COST_IN_SCORES = 4096


def _padded_is_cheaper(state: PackState) -> bool:
    """Whether one masked attention call over the padded batch (the scores of padded keys computed
    and masked) costs less than one call per sequence: small batches of short texts."""
    exact = sum(count * count for _, count in state.segments)
    padded = len(state.segments) * state.length * state.length
    return padded - exact <= (len(state.segments) - 1) * CALL_COST_IN_SCORES


def _padded_sdpa(qkv: torch.Tensor, state: PackState, t: LayerTensors) -> torch.Tensor:
    """Every sequence's attention in one call: the packed QKV rows scattered back to `(B, L)`, padded
    keys masked (as stock masks them), the real queries' rows gathered again. Padded query rows
    are computed and dropped; a row without real tokens attends nothing and is dropped too."""
    full = qkv.new_zeros(state.batch * state.length, qkv.size(1)).index_copy_(0, state.rows, qkv)
    return _sdpa(full, state.batch, state.length, t, state.keep[:, None, None, :]).index_select(0, state.rows)


def _sdpa(qkv: torch.Tensor, batch: int, count: int, t: LayerTensors, key_mask=None) -> torch.Tensor:
    """Attention of `batch` sequences of `count` tokens from their packed QKV rows (`key_mask`: a
    boolean key-padding mask when padded rows are kept, or an additive score bias)."""
    heads, size = t.num_heads, t.embed_dim // t.num_heads
    q, k, v = qkv.view(batch, count, 3, heads, size).permute(2, 0, 3, 1, 4).unbind(0)
    if key_mask is not None and key_mask.is_floating_point() and key_mask.dtype != q.dtype:
        key_mask = key_mask.to(q.dtype)  # a score bias of the loaded dtype, the tokens in a reduced one
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=t.attention_scale)
    return out.transpose(1, 2).reshape(batch * count, t.embed_dim)
