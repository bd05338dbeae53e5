"""The module that owns a converted layer list, and which owner is running its layers right now.

Padding is removed once per stack only while the owner's own forward runs its layer loop: the
owner's class is swapped (like the layers') for one whose forward marks it as running in a
ContextVar (a `PreTrainedModel` owner gets an instance `forward` that does the same, see
`FramedForward`). A layer called any other way (directly, or by code that walks the list itself)
packs and unpacks within its own call, so a packed tensor never escapes. The layer list is read
live from the owner, so truncating or reordering it after conversion stays correct.
"""

from __future__ import annotations

import inspect
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
    last: object = None  # the stack's last layer while a carrier is handed on (it unpacks)
    ahead: object = None  # what the first layer made for the later layers' kernels (layer._Ahead)
    tail: tuple | None = None  # what the layers return after the hidden states (None: a tensor)
    # the later layers that run their stock code as called, decided by the first layer when it found
    # nothing padded (layer: why no fused kernel serves it); `ran` collects those that did, whose
    # counters `settle` brings up to date when the loop ends
    as_called: dict | None = None
    ran: list | None = None
    settle: object = None
    label: str | None = None  # what the first of them computed in

    def close(self) -> None:
        if self.ran:
            self.settle(self)


_running: ContextVar[Frame | None] = ContextVar("bt_plugin_running_stack", default=None)


def _in_frame(owner: nn.Module, forward, args: tuple, kwargs: dict):
    """`forward(*args, **kwargs)` with `owner`'s frame open in this context (closed however it ends)."""
    # Encoders written before transformers 5's output recorders collect hidden states in
    # their own loop: then every layer must hand back (B, L, E), so nothing stays packed.
    frame = Frame(owner, loop_collects(owner, kwargs))
    token = _running.set(frame)
    try:
        return forward(*args, **kwargs)
    finally:
        _running.reset(token)
        frame.close()


class StackOwner:
    """Mixin that precedes the stock class of the module holding the encoder layer list."""

    _bt_stock_class: type

    def forward(self, *args, **kwargs):
        return _in_frame(self, type(self)._bt_stock_class.forward, (self, *args), kwargs)

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


class FramedForward:
    """The forward of a `PreTrainedModel` that runs its layer loop itself (ModernBERT, GTE, Gemma 3,
    Qwen3): an instance attribute, as accelerate's hooks set one, that runs the forward it found
    inside the owner's frame.

    Not a forward hook: any hook on a module sends every call through `nn.Module._call_impl`'s
    slow path, 2-4 % of a one-query call (measured on EmbeddingGemma, torch's own no-op hooks
    included). And not a class swap: a `PreTrainedModel`'s class name is saved in checkpoints.
    Calling `model.forward(...)` directly (sentence-transformers does) opens the frame too.
    """

    def __init__(self, owner: nn.Module, inner=None):
        self.owner = owner
        self.inner = inner  # the instance's own forward it replaced (accelerate's), if any

    def __call__(self, *args, **kwargs):
        owner = self.owner
        if self.inner is not None:
            return _in_frame(owner, self.inner, args, kwargs)
        return _in_frame(owner, type(owner).forward, (owner, *args), kwargs)

    @property
    def __wrapped__(self):
        return self.inner if self.inner is not None else type(self.owner).forward.__get__(self.owner)

    @property
    def __signature__(self):  # what transformers' generate and Trainer read of `model.forward`
        return inspect.signature(self.__wrapped__)

    def __reduce__(self):  # pickle and deepcopy reach the owner through their memo
        return (FramedForward, (self.owner, self.inner))


def attach(owner: nn.Module, attribute: str, layers) -> bool:
    """Make `owner` a stack owner for `layers` (its `attribute`).

    A plain module is class-swapped (like the layers). A `PreTrainedModel` is not (its class name
    is saved in checkpoints): its instance gets a `FramedForward` that opens the frame instead.
    """
    from transformers import PreTrainedModel

    if isinstance(owner, PreTrainedModel):
        if not isinstance(owner.__dict__.get("forward"), FramedForward):
            owner.__dict__["forward"] = FramedForward(owner, owner.__dict__.get("forward"))
    elif not isinstance(owner, StackOwner):
        owner.__class__ = owner_class_for(type(owner))
    for layer in layers:
        layer.__dict__["_bt_owner"] = (owner, attribute)  # plain reference: not a submodule
    return True


def detach(owner: nn.Module) -> None:
    if isinstance(owner, StackOwner):
        owner.__class__ = type(owner)._bt_stock_class
    framed = owner.__dict__.get("forward")
    if isinstance(framed, FramedForward):
        if framed.inner is None:
            del owner.__dict__["forward"]
        else:
            owner.__dict__["forward"] = framed.inner


def current_frame() -> Frame | None:
    """The innermost running frame in this context, whoever owns it."""
    return _running.get()


def running_frame(layer: nn.Module) -> Frame | None:
    """The frame of `layer`'s owner if that owner is running its layer loop in this context."""
    return owned_frame(_running.get(), layer)


def owned_frame(frame: Frame | None, layer: nn.Module) -> Frame | None:
    """`frame` if it is the frame of `layer`'s owner, else None (`running_frame` on a frame already read)."""
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
