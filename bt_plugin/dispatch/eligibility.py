"""Why a layer or a call cannot take the fused path: each check returns a reason string or None.

Reasons read `<what> was <value>` (as PyTorch's `why_not_sparsity_fast_path`) and are kept:
`explain()` shows them. Static reasons are found once at conversion; call reasons every call.
"""

from __future__ import annotations

import torch
from torch import nn

from bt_plugin.dispatch import structure_epoch
from bt_plugin.dispatch.activations import activation_name
from bt_plugin.compat import (
    CACHE_ARGUMENTS, attention_lookup, capture_wrapped, is_transformers_capture_hook, recorded_outputs, version_in,
)
from bt_plugin.spec import LINEAR_ROLES, EncoderSpec, resolve_path, resolve_roles

_NORMS = ("norm1", "norm2")
# Keyword arguments encoder loops pass on to every layer that do not change a self-attention
# layer's math. Any other keyword with a value other than None/False (a cache, cross-attention
# states, a position bias, flash-attention varlen metadata, output_attentions=True, ...) means
# the call is not plain encoder self-attention: the stock forward runs. `num_items_in_batch` is the
# Trainer's token count for normalising the loss (transformers passes the model's **kwargs on to
# every layer), in evaluate() and predict() too.
HARMLESS_KWARGS = frozenset({
    "position_ids", "encoder_attention_mask", "use_cache", "output_hidden_states", "return_dict",
    "cache_position", "token_type_ids", "num_items_in_batch",
})


def _no_fused_layout(spec: EncoderSpec) -> str:
    return f"the {spec.name} spec has no fused layout (the layer runs its own code)"


def _roles_or_reason(layer: nn.Module, spec: EncoderSpec) -> tuple[dict | None, str | None]:
    """`(roles, None)`, or `(None, reason)` when a spec path no longer resolves on the layer."""
    try:
        return resolve_roles(layer, spec), None
    except AttributeError as error:
        return None, f"the layer no longer matches the {spec.name} spec ({error})"


def structure_reason(layer: nn.Module, spec: EncoderSpec, roles: dict | None = None) -> str | None:
    """Whether the layer still has the structure the spec describes (exact module types, shapes)."""
    if not spec.has_fused_layout:
        return _no_fused_layout(spec)
    if roles is None:
        roles, reason = _roles_or_reason(layer, spec)
        if reason:
            return reason
    for role in LINEAR_ROLES:
        if type(roles[role]) is not nn.Linear:
            return f"{getattr(spec, role)} was {_type_name(roles[role])}, not torch.nn.Linear (an adapter?)"
    for role in _NORMS:
        norm = roles[role]
        if type(norm) is not nn.LayerNorm:
            return f"{getattr(spec, role)} was {_type_name(norm)}, not torch.nn.LayerNorm"
    embed, num_heads = roles["out_proj"].out_features, int(roles["num_heads"])
    if num_heads <= 0 or embed % num_heads:
        return f"num_heads was {num_heads}, which does not divide hidden size {embed}"
    for role in ("query", "key", "value", "out_proj"):
        if tuple(roles[role].weight.shape) != (embed, embed):
            return f"{getattr(spec, role)} had weight shape {tuple(roles[role].weight.shape)}, expected ({embed}, {embed})"
    if any(param.is_inference() for param in layer.parameters()):
        return INFERENCE_PARAMETERS
    return None


# Parameters made under torch.inference_mode() (a model created or loaded there) count no versions and
# cannot be re-pointed into one q/k/v storage: a fused kernel could neither hold q/k/v once nor see an
# in-place change to a derived copy's source.
INFERENCE_PARAMETERS = ("its parameters were inference tensors (the model was created or loaded under "
                        "torch.inference_mode()): create or load it outside inference mode to fuse it")


def layer_code_serves_now(layer: nn.Module, spec: EncoderSpec) -> str | None:
    """`layer_code_serves`, remembered on the layer until a submodule is assigned anywhere in the
    process (bt_plugin.dispatch.structure_epoch): the answer depends only on which modules the
    layer holds. An unpadded call of a layer it serves runs the layer's stock code, so even a
    stale answer computes exactly what stock computes."""
    cached = layer.__dict__.get("_bt_serves")
    epoch = structure_epoch.current()
    if cached is not None and cached[0] == epoch:
        return cached[1]
    served = layer_code_serves(layer, spec)
    layer.__dict__["_bt_serves"] = (epoch, served)
    return served


def layer_code_serves(layer: nn.Module, spec: EncoderSpec) -> str | None:
    """Why the layer-code path serves a layer that no fused kernel computes, or None when it
    must not: its spec promises transformers' attention interface, and either declares no fused
    layout or a role is present but not the exact stock module (an adapter, a quantized linear,
    a replaced module).

    Kernel limits (fastpath's activations, head parity, dtypes) and layers that no longer match
    their spec (renamed upstream) keep their reasons: an explicit kernel choice is honoured.
    """
    if not (spec.attention_interface or spec.binned) or layer_code_reason(spec):
        return None
    if not spec.has_fused_layout:
        return _no_fused_layout(spec)
    roles, reason = _roles_or_reason(layer, spec)
    if reason:
        return None
    for role, kind in [(role, nn.Linear) for role in LINEAR_ROLES] + [(role, nn.LayerNorm) for role in _NORMS]:
        if type(roles[role]) is not kind:
            return f"{getattr(spec, role)} was {_type_name(roles[role])}, not torch.nn.{kind.__name__}" + (
                " (an adapter?)" if kind is nn.Linear else "")
    return None


def layer_code_reason(spec: EncoderSpec) -> str | None:
    """Why this transformers version cannot run the spec's layer code padding-free (no attention
    interface to route per-sequence attention through), or None."""
    if spec.binned or not spec.attention_interface:
        return None
    if isinstance(spec.attention_interface, str) and not version_in(spec.attention_interface):
        return (f"{spec.name} layers compute attention with their own code outside "
                f"transformers{spec.attention_interface}")
    return attention_lookup()[1]


def kernel_reason(layer: nn.Module, spec: EncoderSpec, kernel, roles: dict | None = None) -> str | None:
    """Why `kernel` can never serve this layer's structure (activation, heads, eps, biases)."""
    if getattr(kernel, "runs_layer_code", False):
        # a spec that declares no attention interface (MPNet's score bias) cannot run it at all; one
        # declared for some versions is checked on its first call (the layer must call the interface)
        if not (spec.attention_interface or spec.binned):
            return (f"{spec.name} layers compute attention with their own code ({kernel.name} runs a layer's "
                    "code with attention through transformers' attention interface)")
        return None
    roles = roles if roles is not None else resolve_roles(layer, spec)
    return kernel.static_reason(
        activation=activation_name(roles["activation"]),
        num_heads=int(roles["num_heads"]),
        norm1_eps=roles["norm1"].eps,
        norm2_eps=roles["norm2"].eps,
        has_biases=all(roles[role].bias is not None for role in LINEAR_ROLES + _NORMS)
        and all(roles[role].weight is not None for role in _NORMS),
        plain_residuals=roles["layer_scale1"] is None and roles["layer_scale2"] is None
        and _default_scale(roles),
        score_bias=spec.score_bias is not None,
    )


def _default_scale(roles: dict) -> bool:
    """Whether attention scores use the standard `head_dim ** -0.5` (what fastpath computes)."""
    if roles["attention_scale"] is None:
        return True
    head_dim = roles["out_proj"].out_features // int(roles["num_heads"])
    return abs(float(roles["attention_scale"]) - head_dim ** -0.5) < 1e-9


def call_reason(hidden, named: dict, mask_name: str = "attention_mask", handled: tuple[str, ...] = ()) -> str | None:
    """Reasons that hold for every layer of this call: recording, grad inputs, tracing.

    `named`: the call's arguments after the hidden states, by name (`bt_plugin.dispatch.calls.bind`);
    `handled`: the ones the layer's spec says its path handles (besides the mask).
    """
    if type(hidden) is not torch.Tensor:
        return f"hidden states were a {type(hidden).__name__}, not a plain torch.Tensor"
    if torch.compiler.is_compiling():
        return "torch.compile was tracing the model"
    recorded = recorded_outputs() - {"hidden_states"}
    if named.get("output_attentions"):  # encoders that pass it to each layer (before transformers 5)
        recorded = recorded | {"attentions"}
    if recorded:
        return f"the call recorded {', '.join(sorted(recorded))} (output_attentions=True)"
    if hidden.dim() != 3:
        return f"hidden states had {hidden.dim()} dimensions, expected 3"
    for name, value in named.items():
        if name in HARMLESS_KWARGS or name == mask_name or name in handled or value is None or value is False:
            continue
        if name.startswith("*"):
            return f"positional argument {name[1:]} was passed ({type(value).__name__})"
        return f"{name} was passed (only plain encoder self-attention is fused)"
    return None


def cache_reason(layer: nn.Module, named: dict) -> str | None:
    """Why a layer that fills its KV cache cannot serve this call's cache: only an empty one (the
    model's fresh cache of a plain forward, a prefill) is filled padding-free."""
    for name in CACHE_ARGUMENTS:
        cache = named.get(name)
        if cache is None:
            continue
        length = getattr(cache, "get_seq_length", None)
        if length is None or not callable(getattr(cache, "update", None)):
            return f"{name} was a {type(cache).__name__}, not a transformers Cache"
        try:
            index = int(resolve_path(layer, layer._bt_spec.layer_index))
        except (AttributeError, TypeError, ValueError):
            return f"the layer has no cache index at {layer._bt_spec.layer_index}"
        if length(index):
            return f"{name} already held {length(index)} positions (decoding steps run stock)"
    return None


def mode_reason(layer: nn.Module, spec: EncoderSpec, hidden: torch.Tensor) -> str | None:
    """Reasons no padding-free path may run this call: training, the spec's checks, grad (hooks
    are found by `structure_stamp`'s walk)."""
    if layer.training:
        return "the layer was in training mode (model.train())"
    for check in spec.layer_checks:
        reason = check(layer)
        if reason:
            return reason
    if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return "grad was enabled and parameters require grad (use torch.inference_mode() or torch.no_grad())"
    return None


def fused_reason(layer: nn.Module, spec: EncoderSpec, hidden: torch.Tensor, kernel) -> str | None:
    """Reasons a fused kernel cannot compute this layer: its structure, dtype/device, kernel limits."""
    if not spec.has_fused_layout:
        return _no_fused_layout(spec)
    roles, reason = _roles_or_reason(layer, spec)
    reason = reason or structure_reason(layer, spec, roles) or kernel.input_reason(hidden)
    if reason:
        return reason
    weight = roles["out_proj"].weight
    # under autocast stock's ops cast weights and hidden states alike, and so do the kernel's
    mixed = weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type)
    if mixed or weight.device != hidden.device:
        return f"weights were {weight.dtype} on {weight.device}, hidden states {hidden.dtype} on {hidden.device}"
    return kernel_reason(layer, spec, kernel, roles)


def hook_reason(layer: nn.Module) -> str | None:
    """User forward (pre-)hooks on the layer or its submodules; transformers' recorders don't count."""
    return structure_stamp(layer)[1]


def structure_stamp(layer: nn.Module) -> tuple[tuple | None, str | None]:
    """`(stamp, None)`, or `(None, reason)` when user forward hooks are registered on the layer or
    its submodules or a submodule's forward was replaced on the instance.

    The stamp names what a layer's static checks read: every submodule (identity and class) and
    every parameter (identity, storage and dtype). Equal stamps mean the same modules holding the
    same tensors, so a verdict reached for one stamp (the layer's structure, its fused weights)
    holds for the other; replacing a module, a parameter or its storage (`.to()`, `.half()`,
    `load_state_dict(assign=True)`, an adapter) changes it. One plain walk per call: named_modules()
    is too slow to run on every call.
    """
    from torch.nn.modules import module as module_impl

    if module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks:
        return None, "global module forward hooks were registered"
    stamp = []
    extend, pending = stamp.extend, [layer]
    while pending:
        module = pending.pop()
        state = module.__dict__
        if (state["_forward_hooks"] or state["_forward_pre_hooks"]) and _has_user_hook(module):
            name = next(n for n, m in layer.named_modules() if m is module)
            return None, f"forward hooks were registered on {name or 'the layer'}"
        if "forward" in state and module is not layer and capture_wrapped(module):  # attentions recorded (4.5x)
            name = next(n for n, m in layer.named_modules() if m is module)
            if hasattr(state["forward"], "__wrapped__"):  # transformers' recording wrapper
                return None, (f"the call recorded attentions (transformers replaced the forward of {name}; "
                              "output_attentions=True)")
            return None, f"the forward of {name} was replaced on the instance (a fused kernel would skip it)"
        # ids: a tensor's == compares values (a plan's tensors keep these alive)
        extend((id(module), type(module)))
        for param in state["_parameters"].values():
            if param is not None:
                extend((id(param), param.data_ptr(), param.dtype))
        pending += state["_modules"].values()
    return tuple(stamp), None


def _has_user_hook(module: nn.Module) -> bool:
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return any(not is_transformers_capture_hook(hook) for hook in hooks)


def _type_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
