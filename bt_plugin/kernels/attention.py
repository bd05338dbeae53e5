"""Attention per sequence on packed tokens, for layers that run their own code on them.

transformers' attention modules look up their attention function with
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)`
(before that method existed: `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, skipped for
"eager"; `bt_plugin.compat.attention_lookup` says which).
While a layer runs its stock code on packed real tokens (`[1, T, E]`, see `bt_plugin.kernels.layercode`),
that lookup returns `packed_attention` in this context only (a ContextVar: other threads, other
models and every other call are untouched). `packed_attention` runs SDPA per sequence over
exactly that sequence's real tokens, with the mask stock applied among them (a sliding window,
for instance), grouped-query heads and the module's own scaling.

The lookup is wrapped once, with wrapt, the first time a layer takes this path.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bt_plugin.compat import attention_lookup


@dataclass
class Segments:
    """The packed sequences of one layer call: `(start, count)` per sequence, and the boolean
    `(count, count)` mask among its real tokens (None: every token attends to every token)."""

    spans: list[tuple[int, int]]
    masks: list[torch.Tensor | None]
    calls: int = 0
    unsupported: list[str] = field(default_factory=list)


_active: ContextVar[Segments | None] = ContextVar("bt_plugin_packed_attention", default=None)
_install_lock = threading.Lock()
_installed = False
# Keyword arguments of an attention call that change its math in ways packed_attention does not
# compute; a call that passes one with a value is recorded and the layer is re-run stock.
_UNSUPPORTED = ("s_aux", "sinks")


def packed_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """An attention-interface function: `(1, H, T, D)` packed q (k/v may have fewer heads) ->
    `((1, T, H, D), None)`, attending within each sequence of the active `Segments` only."""
    segments = _active.get()
    segments.calls += 1
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            segments.unsupported.append(f"the attention call passed {name}")
    gqa = query.shape[1] != key.shape[1]
    softcap = kwargs.get("softcap")
    attend = _softcapped(softcap) if softcap is not None else F.scaled_dot_product_attention
    outs = [
        attend(
            query[:, :, start:start + count], key[:, :, start:start + count], value[:, :, start:start + count],
            attn_mask=mask, scale=scaling, enable_gqa=gqa,
        )
        for (start, count), mask in zip(segments.spans, segments.masks)
    ]
    out = torch.cat(outs, dim=2) if outs else query.new_zeros(query.shape)
    return out.transpose(1, 2).contiguous(), None


def _softcapped(softcap: float):
    """Attention with the scores soft-capped, `tanh(scores / softcap) * softcap`, before the mask,
    as Gemma 2's eager attention computes it (SDPA has no soft-capping)."""

    def attend(query, key, value, attn_mask=None, scale=None, enable_gqa=False):
        if enable_gqa:
            repeats = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3)) * (scale if scale is not None else query.shape[-1] ** -0.5)
        scores = torch.tanh(scores / softcap) * softcap
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value)

    return attend


@contextmanager
def attending_within(segments: Segments):
    """Route transformers' attention lookups in this context to `packed_attention`."""
    install()
    token = _active.set(segments)
    try:
        yield segments
    finally:
        _active.reset(token)


def _get_interface_wrapper(wrapped, instance, args, kwargs):
    if _active.get() is not None:
        return packed_attention
    return wrapped(*args, **kwargs)


def install() -> None:
    """Wrap the attention lookup once (idempotent, thread-safe); a no-op where this transformers
    has none (then no layer calls `packed_attention`, and the layer-code path refuses)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if not _installed:
            import wrapt

            method, _ = attention_lookup()
            if method is not None:
                wrapt.wrap_function_wrapper(
                    "transformers.modeling_utils", f"AttentionInterface.{method}", _get_interface_wrapper
                )
            _installed = True
