"""Walk a model, swap its encoder layers for fused ones, and undo it.

Conversion never copies a weight: the fused QKV tensor *is* the storage of q/k/v (their
Parameters are re-pointed into it), every other tensor is read from the live submodules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from bt_plugin import kernels
from bt_plugin.loading import registry
from bt_plugin.compat import warn_unsupported_versions_once
from bt_plugin.dispatch.eligibility import kernel_reason, layer_code_serves, structure_reason
from bt_plugin.dispatch.heads import PaddedReads, padded_reads
from bt_plugin.dispatch.derived import fused_qkv, unfuse_qkv
from bt_plugin.dispatch import derived, stock_linears
from bt_plugin.dispatch.layer import FusedLayer, LayerStats, fused_class_for
from bt_plugin.precision import check_precision_name, check_prepack
from bt_plugin.spec import EncoderSpec, resolve_path
from bt_plugin.dispatch.stack import attach, detach

logger = logging.getLogger("bt_plugin")


@dataclass
class PlannedLayer:
    path: str
    layer: nn.Module
    list_path: str
    reason: str | None
    spec: EncoderSpec | None = None  # the family's spec in this layer's layout


@dataclass
class Plan:
    """What `convert` would do to a model: its spec, kernel, and a reason per layer."""

    spec: EncoderSpec | None
    kernel: str
    reason: str | None = None
    layers: list[PlannedLayer] = field(default_factory=list)


def _model_device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def plan(model: nn.Module, kernel: str = "auto") -> Plan:
    """Decide, without changing anything, which layers can be fused and why the others cannot."""
    kernels.check_kernel_name(kernel)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    concrete = kernels.resolve_kernel_name(kernel, _model_device_type(model))
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return Plan(None, concrete, "the model has no transformers config.model_type (not a transformers model)")
    spec, reason = registry.spec_for_config(config)
    if spec is None:
        absent = registry.absent_reason_for_model_type(model_type)
        if absent:
            return Plan(None, concrete, f"model_type {model_type!r} is not served here: {absent}")
        supported = ", ".join(registry.supported_model_types())
        return Plan(None, concrete, f"model_type {model_type!r} is not supported (supported: {supported})")
    result = Plan(spec, concrete, reason)
    if result.reason:
        return result
    classes = spec.resolve_layer_classes()
    for path, stack in _layer_lists(model, classes):
        for index, layer in enumerate(stack):
            # the layer's own spec when converted, else the spec in the layout its class has
            layer_spec = layer._bt_spec if isinstance(layer, FusedLayer) else spec.for_layer(layer)
            reason = structure_reason(layer, layer_spec) or kernel_reason(
                layer, layer_spec, kernels.get_kernel(concrete))
            if reason and layer_code_serves(layer, layer_spec):
                reason = None  # the layer's own code runs on the packed tokens instead (layercode)
            reason = next((r for r in (check(layer) for check in spec.conversion_checks) if r), reason)
            result.layers.append(PlannedLayer(f"{path}.{index}", layer, path, reason, layer_spec))
    if not result.layers:
        names = ", ".join(c.__name__ for c in classes) or ", ".join(spec.layer_classes)
        result.reason = f"no list of {names} layers was found in {type(model).__name__}"
    return result


def _layer_lists(model: nn.Module, classes: tuple[type, ...]):
    if not classes:
        return
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(isinstance(m, classes) for m in module):
            yield path, module


def convert(model: nn.Module, *, kernel: str = "auto", precision: str = "fp32", prepack: bool = False,
            strict: bool = True) -> nn.Module:
    """Swap a transformers model's encoder layers for fused layers, in place.

    Args:
        model: A transformers model (e.g. `BertModel`, `AutoModelForSequenceClassification`).
        kernel: `"auto"` (by device) or a kernel name; an unknown name raises `ValueError`.
        precision: what the encoder layers compute in at inference: `"fp32"` (as loaded),
            `"bf16"` (each layer call under `torch.autocast` bf16; parameters, state_dict and
            the layers' output dtype stay as loaded) or `"auto"` (bf16 only on a CPU with native
            bf16). An unknown name raises `ValueError`. Converting again updates it.
        prepack: hold a second copy of the fused layers' matrix weights in oneDNN's prepacked
            layout (CPU) for faster small calls, at the memory of those weights once more;
            reported by `explain()` (`held beside the parameters`). Default False: no weight is
            held twice (`precision="bf16"` prepacks its bf16 copy either way). Converting again
            updates it.
        strict: Raise `ValueError` with the reason when the model cannot be converted; when
            False (the zero-code path) log a warning and return the model unchanged.

    Returns:
        The same model object, converted. Converting twice is a no-op.

    Example:
        ```python
        >>> import bt_plugin
        >>> model = bt_plugin.convert(BertModel(config).eval())
        >>> bt_plugin.is_converted(model)
        True
        ```
    """
    warn_unsupported_versions_once()
    check_precision_name(precision)
    check_prepack(prepack)
    result = plan(model, kernel)
    converted = sum(isinstance(p.layer, FusedLayer) for p in result.layers)
    todo = [p for p in result.layers if p.reason is None and not isinstance(p.layer, FusedLayer)]
    if result.reason or (not todo and not converted):
        reason = result.reason or next(p.reason for p in result.layers if p.reason)
        if strict:
            raise ValueError(f"bt_plugin cannot convert {type(model).__name__}: {reason}")
        logger.warning("bt_plugin left %s stock: %s", type(model).__name__, reason)
        return model
    reads = padded_reads(model, result.spec)
    for planned in todo:
        _swap(planned.layer, planned.spec, kernel, reads)
    for planned in result.layers:
        if isinstance(planned.layer, FusedLayer):
            state = planned.layer.__dict__
            if (state.get("_bt_precision"), state.get("_bt_prepack")) != (precision, prepack):
                derived.drop(state)  # a copy made for the old choice is not held for the new one
            state.update(_bt_precision=precision, _bt_prepack=prepack)
    for list_path in dict.fromkeys(p.list_path for p in todo):
        owner_path, _, attribute = list_path.rpartition(".")
        owner = resolve_path(model, owner_path) if owner_path else model
        attach(owner, attribute, getattr(owner, attribute))
    model.__dict__["_bt_plugin"] = {"spec": result.spec.name, "kernel": kernel, "precision": precision, "prepack": prepack,
                                    "padded_positions": reads.describe()}
    total = len(result.layers)
    fused = converted + len(todo)
    logger.info("%s: %d/%d layers fused (%s%s)", type(model).__name__, fused, total, result.kernel,
                "" if precision == "fp32" else f", precision {precision}")
    for planned in result.layers:
        if planned.reason:
            logger.debug("%s: %s stays stock: %s", type(model).__name__, planned.path, planned.reason)
    return model


def _swap(layer: nn.Module, spec: EncoderSpec, kernel: str, reads: PaddedReads) -> None:
    layer.__class__ = fused_class_for(type(layer), spec)
    layer.__dict__.update(_bt_kernel=kernel, _bt_stats=LayerStats(), _bt_padded_reads=reads)
    if structure_reason(layer, spec) is None:
        fused_qkv(layer)  # q/k/v now live in one [3E, E] storage: no weight is held twice
    stock_linears.route(layer)  # the layer's own linears, where its stock code runs: a few rows in pieces


def revert(model: nn.Module) -> nn.Module:
    """Restore the stock layer classes (same module and parameter objects), in place.

    Example:
        ```python
        >>> bt_plugin.revert(model)
        >>> bt_plugin.is_converted(model)
        False
        ```
    """
    for module in model.modules():
        detach(module)  # a no-op for anything but a stack owner
        if isinstance(module, FusedLayer):
            unfuse_qkv(module)
            stock_linears.unroute(module)
            for key in [k for k in module.__dict__ if k.startswith("_bt_")]:
                del module.__dict__[key]
            module.__class__ = type(module)._bt_stock_class
    model.__dict__.pop("_bt_plugin", None)
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether any layer of `model` is a fused layer."""
    return any(isinstance(module, FusedLayer) for module in model.modules())
