"""The module that owns a converted layer list, and which owner is running its layers right now.

Padding is removed once per stack only while the owner's own forward runs its layer loop: the
owner's class is swapped (like the layers') for one whose forward marks it as running in a
ContextVar. A layer called any other way (directly, or by code that walks the list itself)
packs and unpacks within its own call, so a packed tensor never escapes. The layer list is read
live from the owner, so truncating or reordering it after conversion stays correct.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from torch import nn

from bt_plugin.compat import loop_collects


@dataclass
class Frame:
    """One run of an owner's layer loop: the packed tensor handed from layer to layer, if any."""

    owner: nn.Module
    collects_outputs: bool = False
    carrier: object = None
    state: object = None
    kernel: object = None
    reduced: object = None  # the autocast dtype the later layers' own code runs under (None: as loaded)
    unpadded: tuple | None = None  # (mask, (batch, length)) a layer found nothing padded under, for the later layers
    token: object = None  # the ContextVar token of a hook-opened frame
    last: object = None  # the stack's last layer while a carrier is handed on (it unpacks)


_running: ContextVar[Frame | None] = ContextVar("bt_plugin_running_stack", default=None)


class StackOwner:
    """Mixin that precedes the stock class of the module holding the encoder layer list."""

    _bt_stock_class: type

    def forward(self, *args, **kwargs):
        # Encoders written before transformers 5's output recorders collect hidden states in
        # their own loop: then every layer must hand back (B, L, E), so nothing stays packed.
        token = _running.set(Frame(self, loop_collects(self, kwargs)))
        try:
            return type(self)._bt_stock_class.forward(self, *args, **kwargs)
        finally:
            _running.reset(token)

    def __reduce_ex__(self, protocol):
        return (_rebuild_owner, (self._bt_stock_class,), dict(self.__dict__))


_OWNER_CLASSES: dict[type, type] = {}


def owner_class_for(stock_class: type) -> type:
    cls = _OWNER_CLASSES.get(stock_class)
    if cls is None:
        cls = type(stock_class.__name__, (StackOwner, stock_class),
                   {"__module__": __name__, "_bt_stock_class": stock_class})
        _OWNER_CLASSES[stock_class] = cls
    return cls


def _rebuild_owner(stock_class: type):
    return object.__new__(owner_class_for(stock_class))


def _open_frame(owner: nn.Module, args, kwargs):
    """Forward pre-hook of a `PreTrainedModel` that runs its layer loop itself (ModernBERT, GTE...)."""
    frame = Frame(owner, loop_collects(owner, kwargs))
    frame.token = _running.set(frame)


def _close_frame(owner: nn.Module, args, kwargs, output):
    """Its forward hook, run even when the forward raised (`always_call`)."""
    frame = _running.get()
    if frame is not None and frame.owner is owner and getattr(frame, "token", None) is not None:
        _running.reset(frame.token)


def attach(owner: nn.Module, attribute: str, layers) -> bool:
    """Make `owner` a stack owner for `layers` (its `attribute`).

    A plain module is class-swapped (like the layers). A `PreTrainedModel` is not (its class name
    is saved in checkpoints): it gets a forward pre-hook and an always-called forward hook that
    open and close the frame instead.
    """
    from transformers import PreTrainedModel

    if isinstance(owner, PreTrainedModel):
        if _open_frame not in owner._forward_pre_hooks.values():
            owner.register_forward_pre_hook(_open_frame, with_kwargs=True)
            owner.register_forward_hook(_close_frame, with_kwargs=True, always_call=True)
    elif not isinstance(owner, StackOwner):
        owner.__class__ = owner_class_for(type(owner))
    for layer in layers:
        layer.__dict__["_bt_owner"] = (owner, attribute)  # plain reference: not a submodule
    return True


def detach(owner: nn.Module) -> None:
    if isinstance(owner, StackOwner):
        owner.__class__ = type(owner)._bt_stock_class
    # found by identity, not by handle: the hooks survive deepcopy and pickle with the model
    for hooks in (owner._forward_pre_hooks, owner._forward_hooks):
        for key in [key for key, hook in hooks.items() if hook in (_open_frame, _close_frame)]:
            del hooks[key]
            for table in (owner._forward_pre_hooks_with_kwargs, owner._forward_hooks_with_kwargs,
                          owner._forward_hooks_always_called):
                table.pop(key, None)


def running_frame(layer: nn.Module) -> Frame | None:
    """The frame of `layer`'s owner if that owner is running its layer loop in this context."""
    frame = _running.get()
    owner_and_attribute = layer.__dict__.get("_bt_owner")
    if frame is None or owner_and_attribute is None or frame.owner is not owner_and_attribute[0]:
        return None
    return frame


def live_layers(layer: nn.Module) -> nn.ModuleList | None:
    """The layer list `layer` belongs to, read from its owner now; None if it has none."""
    owner_and_attribute = layer.__dict__.get("_bt_owner")
    if owner_and_attribute is None:
        return None
    owner, attribute = owner_and_attribute
    layers = getattr(owner, attribute, None)
    return layers if isinstance(layers, nn.ModuleList) else None
