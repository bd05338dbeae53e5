"""How a stock encoder layer is called and what it returns, read off the layer itself.

transformers changes both between versions, family by family and not all at once: BERT's layer
took `(hidden_states, attention_mask, head_mask, encoder_hidden_states, ..., output_attentions)`
positionally and returned a tuple until 4.57, then `(hidden_states, attention_mask, **kwargs)`
and a tensor in 5.0; BART's encoder layer returned `(hidden_states,)` in 4.48, `(hidden_states,
attn_weights)` from 4.55 to 5.0 and a tensor later; DistilBERT named its mask `attn_mask` before 5.0.
So nothing here is a version table:

- the arguments of a call are bound to names with the stock `forward`'s own signature (once per
  class), so the mask, a score bias or `output_attentions` are found by name wherever they sit;
- the return convention (a tensor, or a tuple of how many items) is observed once per stock class
  by calling its stock forward on one zero token, with the mask and any score bias left out.
"""

from __future__ import annotations

import inspect
import threading

import torch

from bt_plugin.compat import ARGUMENT_RENAMES

_names: dict[type, tuple[str, ...]] = {}
_returns: dict[type, int | None] = {}  # stock class -> None (a tensor) or the tuple's length
_lock = threading.Lock()


def parameter_names(stock_class: type) -> tuple[str, ...]:
    """The names of the positional parameters of `stock_class.forward` after `hidden_states`."""
    names = _names.get(stock_class)
    if names is None:
        parameters = list(inspect.signature(stock_class.forward).parameters.values())[2:]  # self, hidden
        names = tuple(p.name for p in parameters
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        _names[stock_class] = names
    return names


def bind(stock_class: type, args: tuple, kwargs: dict) -> dict:
    """`{name: value}` of one call's arguments after the hidden states (positional ones named by
    the signature; any beyond it are named `*1`, `*2`, ...)."""
    names = parameter_names(stock_class)
    named = {(names[i] if i < len(names) else f"*{i + 1}"): value for i, value in enumerate(args)}
    named.update(kwargs)
    return named


def argument_name(stock_class: type, name: str) -> str:
    """`name`, or the name the same argument has in this version's signature (`attn_mask`)."""
    names = parameter_names(stock_class)
    if name in names:
        return name
    return next((alias for alias in ARGUMENT_RENAMES.get(name, ()) if alias in names), name)


def mask_name(layer) -> str:
    """The name of a fused layer's mask parameter in this transformers version."""
    return argument_name(layer._bt_stock_class, layer._bt_spec.mask_argument)


def returned_items(layer, like: torch.Tensor, width: int, named: dict,
                   leave_out: tuple[str, ...]) -> tuple[int | None, str | None]:
    """`(items, reason)`: None when the stock layer returns a tensor, else its tuple's length.

    Observed once per stock class: the stock forward on a `(1, 1, width)` zero input of `like`'s
    dtype and device, with the arguments of this call except those named in `leave_out` (the mask,
    a score bias), which are None. A layer that cannot be probed that way gives a reason (the
    call then runs stock).
    """
    stock_class = layer._bt_stock_class
    if stock_class in _returns:
        return _returns[stock_class], None
    probe = like.new_zeros(1, 1, width)
    arguments = {name: (None if name in leave_out else value) for name, value in named.items()
                 if not name.startswith("*")}
    try:
        with torch.no_grad():
            out = stock_class.forward(layer, probe, **arguments)
    except Exception as error:  # noqa: BLE001 - any failure means: do not guess, run stock
        return None, f"the stock layer's return convention could not be observed ({type(error).__name__}: {error})"
    items = len(out) if isinstance(out, tuple) else None
    with _lock:
        _returns[stock_class] = items
    return items, None
