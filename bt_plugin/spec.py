"""The declarative description of an encoder layer that `patches/` modules provide.

A spec says where the pieces of one architecture family's encoder layer are (attribute paths
relative to the layer), which configurations it serves, and how the layer is called. The core
reads specs; it never names an architecture itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

ConfigCheck = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class EncoderSpec:
    """How to find the BetterTransformer tensors inside one family's encoder layer.

    Args:
        name: Family name, shown by `explain()` and used as the registry key.
        model_types: `config.model_type` values this spec serves.
        layer_classes: Dotted import paths of the encoder layer classes (resolved lazily).
        query: Path of the attention's query `nn.Linear` module.
        key: Path of its key `nn.Linear` module.
        value: Path of its value `nn.Linear` module.
        out_proj: Path of its output projection `nn.Linear` module.
        norm1: Path of the layer norm after attention (before it when `norm_first`).
        linear1: Path of the first feed-forward `nn.Linear` module.
        linear2: Path of the second feed-forward `nn.Linear` module.
        activation: Path of the activation module applied after `linear1`.
        norm2: Path of the layer norm after the feed-forward block.
        num_heads: Path of the attribute holding the number of attention heads.
        norm_first: Whether the layer is pre-layer-norm.
        layer_scale1: Optional path of a per-channel scale tensor applied to the attention branch
            before its residual add (DINOv2's LayerScale).
        layer_scale2: The same for the feed-forward branch.
        attention_scale: Optional path of the attention's score scale (a float attribute);
            None means `head_dim ** -0.5`.
        mask_argument: Name of the attention-mask parameter of the layer's `forward` (found by
            name in each call, wherever the running transformers version puts it; see
            `bt_plugin.dispatch.calls`). What the layer returns (a tensor or a tuple) is observed from the
            stock layer itself, never declared.
        sequence_first: Whether the layer takes and returns `(L, B, E)` (legacy fairseq layout).
        mask_marks_padding: Whether a 2-D mask marks padding with 1/True (legacy fairseq).
        reads_padding: Whether the model reads the layer output at padded positions (SigLIP text
            pools the last position): then padded rows are computed exactly as stock does (no
            padding removed from the dense work, keys still masked), which `packed` can do.
        head_reads: `(class-name suffix, "every" | "first" | "last")` pairs: task heads of this
            family that read the encoder output at padded positions without the mask (CTC decodes
            every frame; a classifier on the first token reads position 0, padding in a left-padded
            row; a causal LM's next-token logits read the last position). A converted model whose class name ends with a suffix gets those padded rows
            computed as stock (see `bt_plugin.dispatch.heads`); first match wins.
        attention_interface: Whether the layer computes attention through transformers' attention
            interface (`ALL_ATTENTION_FUNCTIONS`): True, or the transformers versions in which it
            does (a PEP 440 specifier such as `">=5.0"`; BERT's own SDPA code came before). Then
            the layer's own code can run on packed real tokens (the `layercode` path, see
            `bt_plugin.kernels.layercode`) whenever a fused kernel cannot serve it: adapters, quantized
            linears, rotary / gated layers. A
            spec with no fused roles (query ... num_heads all None) is served by that path only.
        score_bias: Name of a layer argument holding an additive
            `(B or 1, H, L, L)` bias of the attention scores that depends on i - j only (MPNet's
            relative positions): `packed` adds each sequence's block among its real tokens.
        binned: Whether the layer's own attention code (not the attention interface) applies
            the 4-D mask it is given to its scores, and everything it derives from positions for
            the padded length depends on i - j only (DeBERTa). Then its own code runs on bins of
            whole sequences with a block-diagonal mask (`bt_plugin.kernels.binned`).
        pass_through: Arguments the encoder loop passes that the layer's own code handles on
            packed or binned tokens (T5's shared position bias); the layer-code paths pass them
            through unchanged.
        other_layouts: Role paths (dicts of `query=...` etc.) the same layer had in other
            transformers versions (ViT's BERT-style names before 5.x), tried in order when the
            spec's own paths do not resolve on a layer.
        conversion_checks: Callables `layer -> reason | None` run when converting: a reason leaves
            that layer stock (T5's decoder blocks share the encoder's block class).
        layer_kwargs: Keyword arguments the encoder loop passes to every layer that the
            layer-code path packs with the hidden states (e.g. rotary `position_embeddings`).
        transformers: The transformers versions (a PEP 440 specifier, e.g. `">=5.1"`) whose layers
            this spec describes; outside them the registry skips the family with a reason
            (ModernBERT's layers took a separate sliding-window mask before 5.1). None: every
            version that has the layer classes.
        config_checks: Callables `config -> reason | None`; a reason leaves the model stock.
        fills_cache: Whether the layer may be handed a KV cache that it fills (decoder layers used
            as encoders: the model makes a fresh cache when `use_cache` defaults to on). An
            empty cache is served: the layer-code path stores each key and value at stock's
            `(B, H, L, D)` positions (zeros at padded ones), so the returned cache continues
            generation as stock's does. A non-empty cache (a decoding step) runs stock.
        layer_index: Path of the layer's index into the cache (`self_attn.layer_idx`).
        layer_checks: Callables `layer -> reason | None` run on every call (for settings a
            model can switch at run time); a reason runs the stock forward for that call.

    Example:
        ```python
        SPEC = EncoderSpec(name="bert", model_types=("bert",),
                           layer_classes=("transformers.models.bert.modeling_bert.BertLayer",), ...)
        ```
    """

    name: str
    model_types: tuple[str, ...]
    layer_classes: tuple[str, ...]
    query: str | None = None
    key: str | None = None
    value: str | None = None
    out_proj: str | None = None
    norm1: str | None = None
    linear1: str | None = None
    activation: str | None = None
    linear2: str | None = None
    norm2: str | None = None
    num_heads: str | None = None
    norm_first: bool = False
    layer_scale1: str | None = None
    layer_scale2: str | None = None
    attention_scale: str | None = None
    mask_argument: str = "attention_mask"
    sequence_first: bool = False
    mask_marks_padding: bool = False
    reads_padding: bool = False
    head_reads: tuple[tuple[str, str], ...] = ()
    attention_interface: bool | str = False
    score_bias: str | None = None
    binned: bool = False
    pass_through: tuple[str, ...] = ()
    other_layouts: tuple[dict[str, Any], ...] = ()
    conversion_checks: tuple[Callable[[Any], "str | None"], ...] = field(default=())
    layer_kwargs: tuple[str, ...] = ()
    transformers: str | None = None
    config_checks: tuple[ConfigCheck, ...] = field(default=())
    layer_checks: tuple[Callable[[Any], "str | None"], ...] = field(default=())
    fills_cache: bool = False
    layer_index: str = "self_attn.layer_idx"
    layout: dict[str, Any] | None = field(default=None, compare=False)  # set on an other-layout variant

    @property
    def has_fused_layout(self) -> bool:
        """Whether the spec names the roles a fused kernel needs (else: layer code only)."""
        return _derived(self)[0]

    @property
    def role_paths(self) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
        """`(role, path parts)` for every role (None where the spec names none), split once:
        `resolve_roles` runs on every call."""
        return _derived(self)[1]

    def for_layer(self, layer: Any) -> "EncoderSpec":
        """This spec, or the variant with the first of `other_layouts` whose paths all resolve on
        `layer` when the spec's own do not (the layer comes from another transformers version)."""
        if not self.other_layouts or _resolves(layer, self):
            return self
        for layout in self.other_layouts:
            variant = self.with_layout(layout)
            if _resolves(layer, variant):
                return variant
        return self

    def with_layout(self, layout: dict[str, Any] | None) -> "EncoderSpec":
        """The variant of this spec with one of its `other_layouts` (itself for None)."""
        return replace(self, **layout, layout=layout) if layout else self

    def resolve_layer_classes(self) -> tuple[type, ...]:
        """Import and return the layer classes; a missing one is skipped (renamed upstream)."""
        classes = []
        for dotted in self.layer_classes:
            module_name, _, class_name = dotted.rpartition(".")
            try:
                classes.append(getattr(importlib.import_module(module_name), class_name))
            except (ImportError, AttributeError):
                continue
        return tuple(classes)

    def config_reason(self, config: Any) -> str | None:
        """First reason from `config_checks`, or None when the configuration is served."""
        for check in self.config_checks:
            reason = check(config)
            if reason:
                return reason
        return None


def config_flags_false(*names: str) -> ConfigCheck:
    """A config check that gives a reason when any of the named config flags is truthy.

    Example:
        ```python
        config_checks=(config_flags_false("is_decoder", "add_cross_attention"),)
        ```
    """

    def check(config: Any) -> str | None:
        for name in names:
            value = getattr(config, name, False)
            if value:
                return f"config.{name} was {value!r} (only encoder self-attention is fused)"
        return None

    check.__qualname__ = f"config_flags_false{names}"
    return check


# What a spec's fields give, computed once per spec object (the spec itself is kept as the key's owner,
# so its id is never reused while cached); kept outside the instance so `spec.__dict__` holds fields only.
_DERIVED: dict[int, tuple["EncoderSpec", tuple]] = {}


def _derived(spec: "EncoderSpec") -> tuple:
    entry = _DERIVED.get(id(spec))
    if entry is None or entry[0] is not spec:
        if len(_DERIVED) >= 512:  # layout variants are made anew by explain(): keep the cache bounded
            _DERIVED.clear()
        paths = tuple((role, None if getattr(spec, role) is None else tuple(getattr(spec, role).split(".")))
                      for role in ROLES + OPTIONAL_ROLES)
        entry = _DERIVED[id(spec)] = (spec, (all(getattr(spec, role) is not None for role in ROLES), paths))
    return entry[1]


ROLES = ("query", "key", "value", "out_proj", "norm1", "linear1", "activation", "linear2", "norm2", "num_heads")
OPTIONAL_ROLES = ("layer_scale1", "layer_scale2", "attention_scale")
# the roles that are matrix multiplies (nn.Linear in the stock layer)
LINEAR_ROLES = ("query", "key", "value", "out_proj", "linear1", "linear2")


def resolve_roles(layer: Any, spec: EncoderSpec) -> dict[str, Any]:
    """Every role of `spec` resolved on `layer` (raises AttributeError naming a missing part).

    Runs on every call, so submodules are looked up in `_modules` directly (nn.Module's
    `__getattr__` is slow); anything else falls back to getattr.
    """
    roles = {}
    for role, path in spec.role_paths:
        if path is None:
            roles[role] = None
            continue
        obj = layer
        for part in path:
            children = getattr(obj, "_modules", None)
            obj = children[part] if children is not None and part in children else getattr(obj, part)
        roles[role] = obj
    return roles


def _resolves(layer: Any, spec: EncoderSpec) -> bool:
    try:
        resolve_roles(layer, spec)
    except AttributeError:
        return False
    return True


def resolve_path(root: Any, path: str) -> Any:
    """Follow a dotted attribute path from `root`; raises AttributeError naming the missing part."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
