"""The fused encoder layer: an instance of the stock layer class with a dispatching `forward`.

Conversion swaps a layer's class for a subclass of its stock class (so `isinstance`, submodules,
parameter objects, state_dict keys and transformers' hidden-state capture all stay as they are).
Each call either runs a kernel or the stock forward, and records which and why.

Padding is removed once for the whole stack: the stack's first layer packs the hidden states
(a nested tensor for `fastpath`) when every layer of the stack can serve the call; the following
layers see packed input and stay packed; the last layer restores `(B, L, E)`. The per-call state
travels inside the hidden states, so exceptions, nested models and threads need no cleanup.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from bt_plugin.dispatch import derived, structure_epoch
from bt_plugin.dispatch.activations import activation_name
from bt_plugin.dispatch.derived import current_qkv, fused_qkv, unfuse_qkv  # noqa: F401  (conversion's)
from bt_plugin.compat import capture_wrapped, recorded_outputs
from bt_plugin.compat import CACHE_ARGUMENTS
from bt_plugin.dispatch.eligibility import (cache_reason, call_reason, fused_reason, kernel_reason, layer_code_reason,
                                            layer_code_serves, layer_code_serves_now, mode_reason, structure_stamp)
from bt_plugin.dispatch.heads import PaddedReads, padded_reads
from bt_plugin.kernels.binned import BINNED, run_binned
from bt_plugin.dispatch.calls import bind, mask_name, returned_items
from bt_plugin.kernels import KERNELS, LayerTensors, get_kernel
from bt_plugin.kernels.packed import plain_linears
from bt_plugin.kernels.layercode import LAYER_CODE, run_layer
from bt_plugin.dispatch.masks import key_padding_mask, padding_reason
from bt_plugin.precision import compute_dtype, computing_in, precision_label, short_name
from bt_plugin.spec import LINEAR_ROLES, EncoderSpec, resolve_roles
from bt_plugin.dispatch.stack import current_frame, live_layers, owned_frame, running_frame

FASTPATH = KERNELS["fastpath"]  # the one kernel that cannot compute padded rows


@dataclass
class LayerStats:
    """Per-layer counters: how many calls ran fused, how many fell back, and why."""

    fused_calls: int = 0
    fallback_calls: int = 0
    last_reason: str | None = None
    reasons: Counter = field(default_factory=Counter)
    last_kernel: str | None = None  # the kernel of the latest padding-free call
    last_note: str | None = None  # why that call ran the layer's own code, not a fused kernel
    last_precision: str | None = None  # what the latest call computed in ("bf16 (autocast)", "fp32")

    def fused(self, kernel: str | None = None, note: str | None = None) -> None:
        self.fused_calls += 1
        self.last_reason = None
        self.last_kernel, self.last_note = kernel, note

    def fell_back(self, reason: str) -> None:
        self.fallback_calls += 1
        self.last_reason = reason
        self.reasons[reason] += 1


class FusedLayer:
    """Mixin that precedes the stock layer class in a fused layer's MRO."""

    _bt_stock_class: type
    _bt_spec: EncoderSpec

    def forward(self, hidden_states, *args, **kwargs):
        frame = current_frame()
        if frame is not None:
            passing = frame.as_called
            if passing is not None and self in passing and frame.carrier is None:
                # a later layer of a call the first layer found unpadded, running its stock code as
                # called: one dict read here (each Python step between layers costs several times
                # its isolated time); its counters are brought up to date when the loop ends
                frame.ran.append(self)
                return self._bt_stock_class.forward(self, hidden_states, *args, **kwargs)
            frame = owned_frame(frame, self)
        if frame is not None and frame.carrier is not None and hidden_states is frame.carrier:
            # a later layer of a packed stack: the precision was chosen where the stack was packed
            reduced = frame.reduced
            if reduced is None:  # a fused kernel's carrier, or layer code as loaded: no autocast to enter
                return _continue_packed(self, frame, args, kwargs)
            with computing_in(reduced, hidden_states.device.type):
                out = _continue_packed(self, frame, args, kwargs)
            return _in_dtype(self, out, hidden_states.dtype)
        refused = self.__dict__.get("_bt_precision_reason")
        if self.__dict__.get("_bt_precision") in _AS_LOADED:
            # what _dispatch would do first, before the precision choice (as loaded, there is none to
            # make): each step costs several times its isolated time in a short call
            served = _own_code_serves_unpadded(self, hidden_states, args, kwargs)
            if served:
                label = precision_label(hidden_states)
                if frame is not None:
                    _pass_on_as_called(self, frame, label)
                return _own_code_as_called(self, served, hidden_states, args, kwargs,
                                           f"{label} ({refused})" if refused and label else label)
        dtype = None if refused else compute_dtype(self.__dict__.get("_bt_precision"), hidden_states, self,
                                                   lambda: _computes_own_code(self))
        if dtype is not None:
            saved = None if frame is None else (frame.carrier, frame.state, frame.kernel, frame.reduced)
            try:
                with computing_in(dtype, hidden_states.device.type):
                    _stats(self).last_precision = precision_label(hidden_states)
                    out = _dispatch(self, hidden_states, args, kwargs, dtype)
                return _in_dtype(self, out, hidden_states.dtype)
            except RuntimeError as error:  # the layer's own code cannot run under autocast: as loaded
                refused = f"its code raised under autocast {str(dtype).replace('torch.', '')}: {error}"
                if frame is not None:
                    frame.carrier, frame.state, frame.kernel, frame.reduced = saved
                out = _dispatch(self, hidden_states, args, kwargs)  # a call that fails as loaded too raises here
                self.__dict__["_bt_precision_reason"] = refused  # remembered once the call ran as loaded
                _stats(self).last_precision = f"{precision_label(hidden_states)} ({refused})"
                return out
        label = precision_label(hidden_states)
        _stats(self).last_precision = f"{label} ({refused})" if refused and label else label
        return _dispatch(self, hidden_states, args, kwargs)

    def __reduce_ex__(self, protocol):
        # The class is made at run time: rebuild it from the stock class so pickle and deepcopy
        # work in any process. q/k/v get their own storage first (pickle would write the whole
        # shared [3E, E] storage once per view); the fused cache is rebuilt on first use.
        unfuse_qkv(self)
        state = dict(self.__dict__)
        derived.drop(state)  # copies of the weights (reduced precision, prepacked), made again on first use
        state.pop("_bt_plan", None)  # the static verdict, found again on first use
        state.pop("_bt_serves", None)  # counted in this process only
        return (_rebuild, (self._bt_stock_class, self._bt_spec.name, self._bt_spec.layout), state)


def _in_dtype(layer, out, dtype: torch.dtype):
    """A layer's unpacked output in the dtype its input came in (what follows the encoder layers
    reads the dtype it was loaded in); a packed carrier handed to the next layer stays as it is."""
    hidden = out[0] if isinstance(out, tuple) else out
    if not isinstance(hidden, torch.Tensor) or hidden.dtype == dtype or not hidden.is_floating_point():
        return out
    frame = running_frame(layer)
    if frame is not None and frame.carrier is hidden:
        return out
    hidden = hidden.to(dtype)
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


class _TensorName:
    """BetterTransformer's name for one tensor or constant of a fused layer (`in_proj_weight`,
    `linear1_bias`, `num_heads`, ...), read from the live submodules on access.

    A non-data descriptor: a stock layer's own instance attribute of the same name (e.g. a
    layer that stores `self.embed_dim`) wins, so stock code keeps working.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        return getattr(layer_tensors(layer), self.name)


structure_epoch.moves_nothing(FusedLayer)


for _name in (
    "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias", "linear1_weight", "linear1_bias",
    "linear2_weight", "linear2_bias", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias",
    "norm1_eps", "num_heads", "embed_dim", "norm_first",
):
    _descriptor = _TensorName()
    _descriptor.__set_name__(FusedLayer, _name)
    setattr(FusedLayer, _name, _descriptor)


_FUSED_CLASSES: dict[tuple[type, str], type] = {}


def fused_class_for(stock_class: type, spec: EncoderSpec) -> type:
    """The fused subclass of `stock_class` (made once, then cached; `spec` is the family's spec
    in the layout this class has, see `EncoderSpec.for_layer`)."""
    key = (stock_class, spec.name)
    cls = _FUSED_CLASSES.get(key)
    if cls is None:
        cls = type(
            f"Fused{stock_class.__name__}",
            (FusedLayer, stock_class),
            {"__module__": __name__, "_bt_stock_class": stock_class, "_bt_spec": spec},
        )
        _FUSED_CLASSES[key] = cls
    return cls


def _rebuild(stock_class: type, spec_name: str, layout: dict | None = None):
    from bt_plugin.loading.registry import all_specs

    return object.__new__(fused_class_for(stock_class, all_specs()[spec_name].with_layout(layout)))


def layer_tensors(layer) -> LayerTensors:
    """Everything the kernel needs, read from the live modules."""
    r = resolve_roles(layer, layer._bt_spec)
    weight, bias = fused_qkv(layer, r)
    out, lin1, lin2, norm1, norm2, activation = (
        r["out_proj"], r["linear1"], r["linear2"], r["norm1"], r["norm2"], r["activation"]
    )
    tensors = LayerTensors(
        weight, bias, out.weight, out.bias, lin1.weight, lin1.bias, lin2.weight, lin2.bias,
        norm1.weight, norm1.bias, norm2.weight, norm2.bias, norm1.eps,
        int(r["num_heads"]), out.out_features, layer._bt_spec.norm_first,
        activation_name(activation), norm2.eps, activation,
        r["layer_scale1"], r["layer_scale2"],
        float(r["attention_scale"]) if r["attention_scale"] is not None else None,
    )
    one_call = kernel_reason(layer, layer._bt_spec, FASTPATH, r) is None
    sources = tuple(t for role in LINEAR_ROLES for t in (r[role].weight, r[role].bias) if t is not None)
    return dataclasses.replace(tensors, linears=plain_linears(tensors), one_call=one_call, sources=sources)


def _stats(layer) -> LayerStats:
    stats = layer.__dict__.get("_bt_stats")
    if stats is None:
        stats = layer.__dict__["_bt_stats"] = LayerStats()
    return stats


def _score_bias(layer, named: dict):
    spec = layer._bt_spec
    return named.get(spec.score_bias) if spec.score_bias else None


def _bias_reason(bias, batch: int, length: int) -> str | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.dim() != 4 or not bias.is_floating_point():
        return f"the score bias was not a 4-D float tensor ({type(bias).__name__})"
    if bias.shape[0] not in (1, batch) or tuple(bias.shape[2:]) != (length, length):
        return f"the score bias had shape {tuple(bias.shape)}, hidden states were ({batch}, {length})"
    return None


def _returned(layer, hidden: torch.Tensor, packed: bool = False, tail: tuple | None = None):
    """In the stock layer's return convention: sequence-first layout, and `tail` (None: a plain
    tensor; else a tuple `(hidden, *tail)`, e.g. T5's position bias or stock's `None` weights)."""
    if layer._bt_spec.sequence_first and not packed:
        hidden = hidden.transpose(0, 1)
    return hidden if tail is None else (hidden,) + tail


def _kernel_for(layer, hidden):
    device = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    return get_kernel(layer.__dict__.get("_bt_kernel", "auto"), device, torch.is_autocast_enabled(device))


def _own_code_kernel(spec: EncoderSpec):
    """The path that runs a layer's own code for this spec: per-sequence attention through the
    attention interface, or bins of whole sequences."""
    return LAYER_CODE if spec.attention_interface else BINNED


def _runs_own_code(kernel) -> bool:
    return getattr(kernel, "runs_layer_code", False)


@dataclass
class _Plan:
    """A layer's static verdict (`path_for`'s answer past the per-call checks) and its fused
    weights, valid while `key` (the structure stamp, the kernel and what the input's dtype and
    device decide) is unchanged: the checks of a stack's layers then cost one module walk each."""

    key: tuple
    path: tuple
    tensors: LayerTensors | None = None


def _plan(layer, hidden) -> tuple[_Plan | None, str | None]:
    """`(plan, None)` for this call, or `(None, reason)` for hooks or a replaced forward."""
    stamp, reason = structure_stamp(layer)
    if reason:
        return None, reason
    kernel = _kernel_for(layer, hidden)
    device = hidden.device
    key = (stamp, kernel, hidden.dtype, device, torch.is_autocast_enabled(device.type),
           torch.backends.mha.get_fastpath_enabled(), layer.__dict__.get("_bt_layercode_reason"))
    plan = layer.__dict__.get("_bt_plan")
    if plan is None or plan.key != key:
        plan = layer.__dict__["_bt_plan"] = _Plan(key, _static_path(layer, hidden, kernel))
    return plan, None


def _static_path(layer, hidden, kernel) -> tuple[object | None, str | None, str | None]:
    spec = layer._bt_spec
    fused = fused_reason(layer, spec, hidden, kernel)
    if fused is None:
        return kernel, None, None
    refused = layer.__dict__.get("_bt_layercode_reason")
    served = None if refused else layer_code_serves(layer, spec)
    if not served:  # without a fused layout, why the layer code cannot run says more
        return None, None, refused or (None if spec.has_fused_layout else layer_code_reason(spec)) or fused
    return _own_code_kernel(spec), served, None


def path_for(layer, hidden) -> tuple[object | None, str | None, str | None]:
    """`(kernel, note, reason)` for this call: the chosen fused kernel when it can compute the
    layer; else the layer's own code on packed tokens (`note` says why) when its spec allows;
    else `(None, None, reason)`: the stock forward runs."""
    reason = mode_reason(layer, layer._bt_spec, hidden)
    if reason:
        return None, None, reason
    plan, reason = _plan(layer, hidden)
    if reason:
        return None, None, reason
    return plan.path


def _layer_tensors(layer) -> LayerTensors:
    """The layer's kernel tensors from the plan this call's checks validated (read once per plan)."""
    plan = layer.__dict__.get("_bt_plan")
    if plan is None:
        return layer_tensors(layer)
    if plan.tensors is None:
        plan.tensors = layer_tensors(layer)
    return plan.tensors


def _dispatch(layer, hidden, args: tuple, kwargs: dict, reduced: torch.dtype | None = None):
    """Run a padding-free path when the call can be served, else the stock forward, recording why.
    `reduced`: the dtype the layer's precision option computes this call in (None: as loaded); a fused
    kernel computes the packed tokens in it from the padding removal to its restoration."""
    served = _own_code_serves_unpadded(layer, hidden, args, kwargs)
    if served:
        return _own_code_as_called(layer, served, hidden, args, kwargs)
    frame = running_frame(layer)
    named = bind(layer._bt_stock_class, args, kwargs)
    mask = named.get(mask_name(layer))
    batch_first = hidden
    if layer._bt_spec.sequence_first and isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        batch_first = hidden.transpose(0, 1).contiguous()  # legacy (T, B, C) layers (FSMT)
    kernel, note, keep, reason = _eligible(layer, batch_first, named, mask)
    if reason:
        return _stock(layer, reason, hidden, args, kwargs)
    own_code = _runs_own_code(kernel)
    if own_code and (keep is None or padded_reads_of(layer).computes_padded_rows(keep)):
        # nothing to remove, or the model reads padded rows: the layer's own code on the batch
        _stats(layer).fused(kernel.name, note)
        return layer._bt_stock_class.forward(layer, hidden, *args, **kwargs)
    if keep is not None and not own_code and padded_reads_of(layer).computes_padded_rows(keep):
        carrier, state = kernel.pack(batch_first, keep, keep_padded_rows=True)
    else:
        carrier, state = kernel.pack(batch_first, keep)
    bias = _score_bias(layer, named)
    if bias is not None:
        kernel.with_score_bias(state, bias)
    if reduced is not None and not own_code:  # cast once here, not per op; unpack restores the dtype
        carrier = carrier.to(reduced)
    # the later layers' checks run before this layer's kernel, while what they read is still in the
    # caches (after a layer's weights streamed through, each Python step costs several times more)
    later = _packed_until(layer, batch_first, kernel) if frame is not None else None
    ahead = None
    if later and not own_code and (reduced is not None or not torch.is_autocast_enabled(carrier.device.type)):
        ahead = _Ahead(layer, later, args, kwargs, carrier)
    with torch.autocast(hidden.device.type, enabled=False) if reduced is not None and not own_code else nullcontext():
        out, tail, reason = _run(kernel, layer, carrier, state, named)
    if reason:
        return _stock(layer, reason, hidden, args, kwargs)
    _stats(layer).fused(kernel.name, note)
    if later:
        # a fused kernel's carrier is already in the reduced dtype; the layer code of the later
        # layers runs under the same autocast as this one
        frame.carrier, frame.state, frame.kernel, frame.reduced = out, state, kernel, reduced if own_code else None
        frame.last, frame.tail, frame.ahead = later[-1], tail, ahead
        return _returned(layer, out, packed=True, tail=tail)  # the next layer continues
    return _returned(layer, kernel.unpack(out, state), tail=tail)


def _own_code_serves_unpadded(layer, hidden, args: tuple, kwargs: dict) -> str | None:
    """Why the layer's own code on the batch is this call's padding-free path (the layer code
    serves the layer, which is in eval mode, and nothing is padded), or None."""
    served = None if layer.training else layer_code_serves_now(layer, layer._bt_spec)
    if not served:
        return None
    mask = bind(layer._bt_stock_class, args, kwargs).get(mask_name(layer))
    return served if mask is None or _nothing_padded(layer, hidden, mask) else None


def _own_code_as_called(layer, served: str, hidden, args: tuple, kwargs: dict, label: str | None = None):
    """No padding and no fused kernel for this layer: its stock code on the batch is the
    padding-free path (skipping the per-call checks keeps unpadded batches as fast as stock)."""
    stats = _stats(layer)
    if label is not None:
        stats.last_precision = label
    stats.fused(_own_code_kernel(layer._bt_spec).name, served)
    return layer._bt_stock_class.forward(layer, hidden, *args, **kwargs)


# the precision choices under which a layer computes as loaded, whatever the call
_AS_LOADED = (None, "fp32")


def _pass_on_as_called(layer, frame, label: str | None) -> None:
    """When `layer` is the first of its stack and runs its stock code as called (nothing padded,
    computing as loaded), let the later layers that would decide the same do so with one dict read:
    those that compute as loaded, in eval mode, whose layer code serves them now. Their own masks
    are not read again: they come from the same input, and a layer running its stock code on the
    batch is exact whatever its mask holds."""
    layers = live_layers(layer)
    if layers is None or len(layers) < 2 or layers[0] is not layer:
        return
    passing = {}
    for other in list(layers)[1:]:
        state = other.__dict__
        if isinstance(other, FusedLayer) and not other.training and state.get("_bt_precision") in _AS_LOADED:
            served = layer_code_serves_now(other, other._bt_spec)
            if served:
                passing[other] = served
    if passing and frame.as_called is None:  # a first layer called again in the loop keeps what ran
        frame.as_called, frame.ran, frame.settle, frame.label = passing, [], _settle_as_called, label


def _settle_as_called(frame) -> None:
    """The counters of the layers that ran their stock code as called under `_pass_on_as_called`."""
    for layer in frame.ran:
        refused = layer.__dict__.get("_bt_precision_reason")
        stats = _stats(layer)
        stats.last_precision = f"{frame.label} ({refused})" if refused and frame.label else frame.label
        stats.fused(_own_code_kernel(layer._bt_spec).name, frame.as_called[layer])


def _computes_own_code(layer) -> bool:
    """Whether the layer's latest path runs its own code (layer code, bins) rather than a fused
    kernel (before its first call: whether its spec or a replaced module sends it there)."""
    plan = layer.__dict__.get("_bt_plan")
    if plan is not None and plan.path[0] is not None:
        return _runs_own_code(plan.path[0])
    return not layer._bt_spec.has_fused_layout or bool(layer_code_serves_now(layer, layer._bt_spec))


def _nothing_padded(layer, hidden, mask) -> bool:
    """Whether a mask the layer-code paths read keeps every position (every key is attended by
    some query of its row): then the layer's own code on the batch is already padding-free."""
    spec = layer._bt_spec
    if spec.sequence_first or spec.mask_marks_padding or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return False
    # the layers of one stack call share its mask: the first layer's answer serves the later ones
    # (four tensor ops and a sync fewer per layer)
    frame, shape = running_frame(layer), (hidden.size(0), hidden.size(1))
    if frame is not None and frame.unpadded is not None and frame.unpadded[0] is mask and frame.unpadded[1] == shape:
        return True
    keep, reason = LAYER_CODE.keep_mask(mask, *shape)
    unpadded = keep is None and reason is None
    if unpadded and frame is not None:
        frame.unpadded = (mask, shape)
    return unpadded


def _stock(layer, reason: str, hidden, args: tuple, kwargs: dict):
    current_qkv(layer)  # after .half() etc. a fallback must not keep the old weights alive
    _stats(layer).fell_back(reason)
    return layer._bt_stock_class.forward(layer, hidden, *args, **kwargs)


def _run(kernel, layer, carrier, state, named: dict):
    """`(out, tail, reason)`: one layer on the packed carrier, and what the stock layer returns
    after its hidden states (`tail`, None for a plain tensor); a layer-code call may refuse."""
    if not _runs_own_code(kernel):
        tensors = _layer_tensors(layer)
        items, reason = returned_items(layer, tensors.out_proj_weight, tensors.embed_dim, named,
                                       (mask_name(layer), layer._bt_spec.score_bias))
        if reason:
            return None, None, reason
        return _fused_layer(kernel, layer, carrier, tensors, state), (None if items is None else (None,) * (items - 1)), None
    out, reason = (run_layer if kernel is LAYER_CODE else run_binned)(layer, carrier, state, named)
    if reason:
        if out is not None:  # refused after running (it bypassed the attention interface): for good
            layer.__dict__["_bt_layercode_reason"] = reason
        return None, None, reason  # a mask refused before running concerns this call only
    if isinstance(out, tuple):  # the layer's own tuple: keep what follows the hidden states
        return out[0], tuple(out[1:]), None
    return out, None, None


def _fused_layer(kernel, layer, carrier: torch.Tensor, tensors: LayerTensors, state):
    """One layer through a fused kernel on the carrier, its matrix multiplies on the weights the
    carrier's dtype calls for (bt_plugin.dispatch.derived: the parameters, or a reduced-precision or
    prepacked copy). Under a user's autocast the kernel's ops are cast as stock's are, on the
    parameters."""
    if torch.is_autocast_enabled(carrier.device.type):
        _stats(layer).last_precision = precision_label(carrier)
    else:
        tensors = derived.kernel_tensors(layer, tensors, carrier.dtype)
        _stats(layer).last_precision = _kernel_label(carrier.dtype, tensors)
    return kernel.layer(carrier, tensors, state)


def _kernel_label(dtype: torch.dtype, tensors: LayerTensors) -> str:
    """What a fused kernel's call computes in: `fp32`, `bf16 (prepacked)`, ..."""
    return short_name(dtype) + (" (prepacked)" if tensors.linears.prepacked else "")


def _hand_on(layer, frame, out, tail: tuple | None):
    """A later layer's output on the packed carrier: restored to `(B, L, E)` by the stack's last
    layer, else handed to the next layer."""
    if frame.last is layer:
        frame.carrier = None
        return _returned(layer, frame.kernel.unpack(out, frame.state), tail=tail)
    frame.carrier = out
    return _returned(layer, out, packed=True, tail=tail)


def _continue_packed(layer, frame, args: tuple, kwargs: dict):
    """A later layer of a stack whose first layer packed the call (after checking every layer).

    It runs on every later layer of every call, where a short call's time is counted: each Python
    step here costs several times its isolated time once the layer's weights have streamed through
    the caches, so it reads what the first layer's checks left on the frame instead of asking again."""
    ahead = frame.ahead
    entry = None if ahead is None else ahead.entry(layer, args, kwargs)
    if entry is not None:
        return _run_ahead(layer, frame, *entry)
    own_code = _runs_own_code(frame.kernel)
    stats = _stats(layer)
    if own_code:
        stats.last_precision = precision_label(frame.carrier)  # a fused kernel says more
    named = bind(layer._bt_stock_class, args, kwargs)
    bias = _score_bias(layer, named)
    if bias is not None and bias is not frame.state.score_bias:  # MPNet hands every layer the same one
        frame.kernel.with_score_bias(frame.state, bias)
    out, tail, reason = _run(frame.kernel, layer, frame.carrier, frame.state, named)
    if reason:  # leave the stack unpacked from here on; real tokens stay exact (keys masked)
        padded = frame.kernel.unpack(frame.carrier, frame.state)
        frame.carrier = None
        return _stock(layer, reason, padded, args, kwargs)
    # the note is why no fused kernel serves the layer (what path_for reported for it in _packed_until)
    stats.fused(frame.kernel.name, layer_code_serves_now(layer, layer._bt_spec) if own_code else None)
    return _hand_on(layer, frame, out, tail)


def _eligible(layer, hidden, named: dict, mask):
    """`(kernel, note, keep, reason)`: the path, the key-padding mask to pack with, or why the
    stock forward must run."""
    spec = layer._bt_spec
    handled = spec.layer_kwargs + spec.pass_through + ((spec.score_bias,) if spec.score_bias else ())
    if spec.fills_cache:
        handled += CACHE_ARGUMENTS
    reason = call_reason(hidden, named, mask_name(layer), handled)
    reason = reason or (cache_reason(layer, named) if spec.fills_cache else None)
    reason = reason or _bias_reason(_score_bias(layer, named), hidden.size(0), hidden.size(1))
    if reason:
        return None, None, None, reason
    kernel, note, reason = path_for(layer, hidden)
    if reason:
        return None, None, None, reason
    if spec.mask_marks_padding and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = mask == 0  # legacy masks mark padding with 1/True
    if _runs_own_code(kernel):
        keep, reason = LAYER_CODE.keep_mask(mask, hidden.size(0), hidden.size(1))
    else:
        keep, reason = key_padding_mask(mask, hidden.size(0), hidden.size(1))
    if reason is None and keep is not None:
        reason = padding_reason(keep, right_padded_only=kernel.right_padded_only,
                                needs_a_real_token=getattr(kernel, "needs_a_real_token", False))
        reads = padded_reads_of(layer)
        padded_rows_read = reason is None and reads.computes_padded_rows(keep)
        if padded_rows_read and kernel is FASTPATH:
            reason = f"padded positions are read ({reads.why}); {kernel.name} drops them (packed computes them)"
        if reason is None and padded_rows_read and not _runs_own_code(kernel) and not bool(keep.any(dim=1).all()):
            reason = _empty_row_reason(mask, reads)
    return kernel, note, keep, reason


def _empty_row_reason(mask, reads: PaddedReads) -> str | None:
    """Why a fused kernel cannot compute, as stock does, the padded rows of a row with no real
    token, or None. Under an sdpa boolean mask stock's attention there is torch's (the kernel's
    own); under an additive mask (eager, transformers 4.x) stock attends uniformly to every key,
    and a legacy layer's own attention code does what it does with its key-padding mask."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4:
        return None
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        return f"padded positions are read ({reads.why}) and a row had no real token under an additive mask"
    return (f"padded positions are read ({reads.why}) and a row had no real token under the layer's own "
            "key-padding mask (its own attention code decides what such a row attends)")


def padded_reads_of(layer) -> PaddedReads:
    """What the converted model reads at padded positions (decided once, at conversion)."""
    reads = layer.__dict__.get("_bt_padded_reads")
    if reads is None:  # not converted through convert(): only its spec can say
        reads = padded_reads(layer, layer._bt_spec) if layer._bt_spec.reads_padding else PaddedReads(None)
    return reads


def _packed_until(layer, hidden, kernel):
    """The later layers (the last of them unpacks) when the stack stays packed from here: this is its
    first layer and every later layer takes the same path for this call; else None.

    When hidden states are being recorded each layer must return `(B, L, E)`, so layers pack and
    unpack one by one instead.
    """
    layers = live_layers(layer)
    if layers is None or len(layers) < 2 or layers[0] is not layer:
        return None
    if "hidden_states" in recorded_outputs() or running_frame(layer).collects_outputs \
            or any(capture_wrapped(other) for other in layers):
        return None
    later = list(layers)[1:]
    for other in later:
        if not isinstance(other, FusedLayer) or path_for(other, hidden)[0] is not kernel:
            return None
    return later


class _Ahead:
    """What a stack's first layer, packing the call for a fused kernel, makes for the later layers
    before its own kernel runs: each later layer's kernel tensors at the carrier's dtype (its
    derived copy checked, see bt_plugin.dispatch.derived) and its precision label. Made there in one
    go rather than layer by layer after each kernel: right after a layer's weights streamed through
    the caches each Python step costs several times more.

    A later layer uses them when its call is the first layer's again (`entry`): the same class (same
    signature and return convention) and the very same argument objects after the hidden states (an
    encoder loop hands every layer the same mask), so the first layer's checks of the call hold for
    it. Made and used only outside autocast (where a later layer's kernel reads these tensors)."""

    __slots__ = ("cls", "args", "kwargs", "layers", "device")

    def __init__(self, layer, later: list, args: tuple, kwargs: dict, carrier: torch.Tensor):
        self.cls, self.args, self.kwargs, self.device = type(layer), args, kwargs, carrier.device.type
        dtype, self.layers = carrier.dtype, {}
        for other in later:
            tensors = derived.kernel_tensors(other, _layer_tensors(other), dtype)
            self.layers[other] = (tensors, _kernel_label(dtype, tensors))

    def entry(self, layer, args: tuple, kwargs: dict) -> tuple | None:
        """`(tensors, label)` for `layer` called with these arguments, or None (check it as usual)."""
        entry = self.layers.get(layer)
        first, named = self.args, self.kwargs
        if (entry is None or type(layer) is not self.cls or len(args) != len(first)
                or not all(map(operator.is_, args, first)) or kwargs.keys() != named.keys()
                or not all(named[key] is value for key, value in kwargs.items())
                or torch.is_autocast_enabled(self.device)):
            return None
        return entry


def _run_ahead(layer, frame, tensors: LayerTensors, label: str):
    """A later layer of a stack packed for a fused kernel, called as the first layer was: its kernel
    on the carrier with what the first layer made for it (`_Ahead`), the call not checked again."""
    stats = _stats(layer)
    stats.last_precision = label
    out = frame.kernel.layer(frame.carrier, tensors, frame.state)
    stats.fused(frame.kernel.name, None)
    return _hand_on(layer, frame, out, frame.tail)
