"""The `layercode` path: a layer's own stock code on the packed real tokens of a batch.

Every token-wise module runs exactly as the user has it (a plain or LoRA-wrapped or quantized
Linear, a gated MLP, RMSNorm, rotary embedding...) on `[1, T, E]`, the `T` real tokens of the
batch in one row; attention runs per sequence over exactly its real tokens (`bt_plugin.kernels.attention`).
Inputs the encoder loop hands every layer with a `(B, L, ...)` layout (rotary cos/sin,
position ids) are packed the same way; the mask of each layer call becomes, per sequence, the mask
stock applies among its real tokens.

It serves layers whose spec says they compute attention through transformers' attention
interface, when a fused kernel cannot serve them; a stack packs once, like the fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bt_plugin.kernels.attention import Segments, attending_within
from bt_plugin.compat import CACHE_ARGUMENTS
from bt_plugin.dispatch.calls import mask_name

# An additive mask entry at or below this is "masked" (as in bt_plugin.dispatch.masks).
_MASKED_AT_OR_BELOW = -1.0e4


def attend_matrix(mask, batch: int, length: int) -> tuple[torch.Tensor | None, str | None]:
    """`((B, L, L) bool "query attends key", None)` from the mask a layer is called with, `(None,
    None)` for no mask, or `(None, reason)` for a mask this path cannot read."""
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        return None, f"attention mask was a {type(mask).__name__}, not a tensor"
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != batch or mask.shape[-1] != length:
        return None, f"attention mask had shape {tuple(mask.shape)} (expected (B, 1, Q, K) or (B, K))"
    attend = mask if mask.dtype == torch.bool else (mask > _MASKED_AT_OR_BELOW if mask.is_floating_point() else mask != 0)
    return attend[:, 0].expand(batch, length, length), None


@dataclass
class LayerCodeState:
    """Where the `T` real tokens of a `(B, L)` batch live, and per-mask segment caches."""

    batch: int
    length: int
    keep: torch.Tensor
    rows: torch.Tensor
    spans: list[tuple[int, int]]
    reals: list[torch.Tensor]
    _masks: dict = field(default_factory=dict)
    _packed: dict = field(default_factory=dict)


class OwnCodeKernel:
    """A kernel that runs the layer's own code (its modules do the math, on any device and dtype)."""

    runs_layer_code = True
    keeps_padded_rows = False
    right_padded_only = False
    needs_a_real_token = True  # the layer's own modules reshape by the token count

    def input_reason(self, hidden: torch.Tensor) -> str | None:
        """Any device and dtype: the layer's own modules do the math."""
        return None


class LayerCodeKernel(OwnCodeKernel):
    """Padding removed once; the layer's own code on `[1, T, E]`, attention per sequence."""

    name = "layercode"

    @staticmethod
    def keep_mask(mask, batch: int, length: int) -> tuple[torch.Tensor | None, str | None]:
        """`(keep, reason)`: `(B, L)` True for real tokens (keys some query attends), None when
        nothing is padded."""
        attend, reason = attend_matrix(mask, batch, length)
        if reason or attend is None:
            return None, reason
        keep = attend.any(dim=1)
        return (None, None) if bool(keep.all()) else (keep, None)

    def pack(self, hidden: torch.Tensor, keep: torch.Tensor):
        batch, length, embed = hidden.shape
        counts = keep.sum(dim=1).tolist()
        rows = keep.reshape(-1).nonzero().squeeze(1)
        spans, start = [], 0
        for count in counts:
            if count:
                spans.append((start, count))
            start += count
        reals = [keep[b].nonzero().squeeze(1) for b in range(batch) if counts[b]]
        carrier = hidden.reshape(batch * length, embed).index_select(0, rows).unsqueeze(0)
        return carrier, LayerCodeState(batch, length, keep, rows, spans, reals)

    def unpack(self, carrier: torch.Tensor, state: LayerCodeState) -> torch.Tensor:
        embed = carrier.size(-1)
        out = carrier.new_zeros(state.batch * state.length, embed)
        return out.index_copy_(0, state.rows, carrier[0]).view(state.batch, state.length, embed)

    def segments(self, mask, state: LayerCodeState) -> tuple[Segments | None, str | None]:
        """The per-sequence masks stock applies among each sequence's real tokens (cached per mask)."""
        key = id(mask)
        if key not in state._masks:
            state._masks[key] = (mask, *self._segments(mask, state))  # keep `mask` alive: ids stay unique
        return state._masks[key][1], state._masks[key][2]

    def _segments(self, mask, state: LayerCodeState):
        attend, reason = attend_matrix(mask, state.batch, state.length)
        if reason:
            return None, reason
        masks = []
        rows = [b for b in range(state.batch) if bool(state.keep[b].any())]
        for b, real in zip(rows, state.reals):
            if attend is None:
                masks.append(None)
                continue
            among = attend[b].index_select(0, real)
            if bool(among[:, ~state.keep[b]].any()):
                return None, "a real token attended a padded position (not a key-padding mask)"
            among = among.index_select(1, real)
            masks.append(None if bool(among.all()) else among[None, None])
        return Segments(list(state.spans), masks), None

    def packed_argument(self, value, state: LayerCodeState):
        """A `(B or 1, L, ...)` tensor (or tuple of them) packed like the hidden states; anything
        else unchanged. Cached per object: the loop hands every layer the same rotary tensors."""
        key = id(value)
        if key not in state._packed:
            state._packed[key] = (value, self._pack_argument(value, state))
        return state._packed[key][1]

    def _pack_argument(self, value, state: LayerCodeState):
        if isinstance(value, tuple):
            return tuple(self._pack_argument(item, state) for item in value)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != state.length:
            return value
        if value.shape[0] not in (1, state.batch):
            return value
        full = value.expand(state.batch, *value.shape[1:])
        flat = full.reshape(state.batch * state.length, *value.shape[2:])
        return flat.index_select(0, state.rows).unsqueeze(0)


LAYER_CODE = LayerCodeKernel()


class UnpackingCache:
    """An empty KV cache as a layer running on packed tokens hands it keys and values: stored at
    stock's `(B, H, L, D)` positions (zeros at padded ones, which every later step masks), while
    the layer attends over the packed ones it computed. Everything else goes to the real cache."""

    def __init__(self, cache, state: LayerCodeState):
        self._bt_cache, self._bt_state = cache, state

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._bt_cache.update(self._unpack(key_states), self._unpack(value_states), layer_idx, *args, **kwargs)
        return key_states, value_states  # the cache was empty: attention sees exactly these

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`(1, H, T, D)` packed keys or values -> `(B, H, L, D)`, zeros at padded positions."""
        _, heads, tokens, size = packed.shape
        tokens_first = packed.transpose(1, 2).reshape(1, tokens, heads * size)
        padded = LAYER_CODE.unpack(tokens_first, self._bt_state)  # (B, L, H * D)
        return padded.view(*padded.shape[:2], heads, size).transpose(1, 2)

    def __getattr__(self, name):
        return getattr(self._bt_cache, name)


def run_layer(layer, carrier: torch.Tensor, state: LayerCodeState, named: dict):
    """`(output, reason)`: the stock forward of `layer` on the packed tokens, or a reason: then the
    caller runs the stock forward on the padded batch. A reason with `output` None concerns this
    call (its mask); with an output, the layer itself (it bypassed the attention interface).
    `named`: the call's arguments by name (`bt_plugin.dispatch.calls.bind`)."""
    spec = layer._bt_spec
    name = mask_name(layer)
    segments, reason = LAYER_CODE.segments(named.get(name), state)
    if reason:
        return None, reason
    arguments = {key: (LAYER_CODE.packed_argument(value, state) if key in spec.layer_kwargs else value)
                 for key, value in named.items() if not key.startswith("*")}
    arguments[name] = None
    if spec.fills_cache:
        for key in CACHE_ARGUMENTS:
            if arguments.get(key) is not None:
                arguments[key] = UnpackingCache(arguments[key], state)
    segments = Segments(segments.spans, segments.masks)  # a fresh call counter
    with attending_within(segments):
        out = layer._bt_stock_class.forward(layer, carrier, **arguments)
    # refused after running: `out` is returned (not used) so the caller knows the refusal is for good
    if segments.calls == 0:
        return out, "the layer did not call transformers' attention interface (its own attention code)"
    if segments.unsupported:
        return out, segments.unsupported[0]
    return out, None
