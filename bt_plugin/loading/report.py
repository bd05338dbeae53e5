"""`explain(model)`: per encoder layer, whether it is fused, with which kernel, and why not."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from bt_plugin.loading.conversion import plan
from bt_plugin.kernels import resolve_kernel_name, torch_ops
from bt_plugin.dispatch.derived import held_bytes
from bt_plugin.dispatch.layer import FusedLayer, LayerStats


@dataclass
class LayerReport:
    """One encoder layer: `converted` (fused class installed), its kernel, and the latest reason.

    `reason` is the static reason for a layer left stock, or the reason its latest call fell back
    to the stock forward (None when that call ran fused). `kernel` is the kernel of its latest
    padding-free call (`layercode` when it ran its own code on packed tokens, `note` says why).
    """

    path: str
    converted: bool
    kernel: str | None
    reason: str | None
    fused_calls: int = 0
    fallback_calls: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    precision: str | None = None  # what its latest call computed in: "fp32", "bf16 (prepacked)", "bf16 (autocast)"
    held_bytes: int = 0  # derived weights held beside its parameters (bt_plugin.dispatch.derived)

    @property
    def status(self) -> str:
        if not self.converted:
            return "stock"
        if self.reason:
            return "fallback"
        return "fused" if self.fused_calls else "fused (not called yet)"


@dataclass
class Explanation:
    """What bt_plugin did with a model; `str()` gives a table, `to_dict()` plain data."""

    model: str
    family: str | None
    reason: str | None
    layers: list[LayerReport]
    padded_positions: str | None = None
    precision: str | None = None  # the precision choice it was converted with ("fp32", "bf16", "auto")
    prepack: bool = False  # whether it was converted with the prepacked weight copy (opt-in)
    # the private torch operators this torch cannot serve, with the kernel each turns off (torch_ops)
    unavailable_ops: list[str] = field(default_factory=list)

    @property
    def fused_layers(self) -> int:
        return sum(layer.converted for layer in self.layers)

    @property
    def held_bytes(self) -> int:
        """Bytes of derived weights held beside the parameters now (reduced-precision or prepacked
        copies, made at a layer's first call that uses them; 0 when none is held)."""
        return sum(layer.held_bytes for layer in self.layers)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        head = f"{self.model}: {self.fused_layers}/{len(self.layers)} encoder layers converted"
        if self.family:
            head += f" (family {self.family})"
        lines = [head]
        if self.reason:
            lines.append(f"  not converted: {self.reason}")
        if self.precision and self.precision != "fp32":
            lines.append(f"  precision choice: {self.precision} (what each layer's latest call computed in: precision= below)")
        if self.held_bytes or self.prepack:
            why = "the prepacked copy (prepack=True)" if self.prepack else f"the {self.precision} copy"
            lines.append(f"  held beside the parameters: {self.held_bytes / 2**20:.1f} MiB of matrix weights ({why})")
        lines += [f"  private torch operator unavailable: {why}" for why in self.unavailable_ops]
        if self.padded_positions:
            lines.append(f"  padded positions of the encoder output: {self.padded_positions}")
        for layer in self.layers:
            detail = f"  {layer.path:<28} {layer.status:<22} kernel={layer.kernel or '-'}"
            detail += f" fused_calls={layer.fused_calls} fallback_calls={layer.fallback_calls}"
            if layer.precision:
                detail += f" precision={layer.precision}"
            if layer.reason:
                detail += f"\n      reason: {layer.reason}"
            elif layer.note:
                detail += f"\n      layer code on packed tokens, not a fused kernel: {layer.note}"
            lines.append(detail)
        return "\n".join(lines)


def explain(model: nn.Module, kernel: str | None = None) -> Explanation:
    """Report, per encoder layer, whether it is fused and, if not, why.

    Args:
        model: Any model; for one that is not converted, the report says what `convert` would do.
        kernel: For layers not converted, judge them for this kernel (default: the kernel the
            model was converted with, else `"auto"`).

    Example:
        ```python
        >>> print(bt_plugin.explain(model))
        BertModel: 12/12 encoder layers converted (family bert)
          encoder.layer.0   fused   kernel=fastpath fused_calls=1 fallback_calls=0
        ```
    """
    kernel = kernel or model.__dict__.get("_bt_plugin", {}).get("kernel", "auto")
    result = plan(model, kernel)
    reports = [_report(p.path, p.layer, p.reason) for p in result.layers]
    family = result.spec.name if result.spec else None
    padded_positions = model.__dict__.get("_bt_plugin", {}).get("padded_positions")
    precision = model.__dict__.get("_bt_plugin", {}).get("precision")
    prepack = bool(model.__dict__.get("_bt_plugin", {}).get("prepack"))
    return Explanation(type(model).__name__, family, result.reason, reports, padded_positions, precision, prepack,
                       torch_ops.unavailable())


def _report(path: str, layer: nn.Module, static_reason: str | None) -> LayerReport:
    if not isinstance(layer, FusedLayer):
        return LayerReport(path, False, None, static_reason or "not converted (call bt_plugin.convert)")
    stats: LayerStats = layer.__dict__.get("_bt_stats") or LayerStats()
    device = next(layer.parameters()).device.type
    kernel = stats.last_kernel or resolve_kernel_name(layer.__dict__.get("_bt_kernel", "auto"), device)
    return LayerReport(
        path, True, kernel, stats.last_reason,
        stats.fused_calls, stats.fallback_calls, dict(stats.reasons), stats.last_note, stats.last_precision,
        held_bytes(layer),
    )
