"""A converted layer's own `nn.Linear` modules, for the calls that run the layer's stock code.

MKL's sgemm (`F.linear` on a CPU) is slow for 4 to 15 rows times a large weight
(bt_plugin.kernels.linear.SPLIT_ROWS): one short query, unpadded, is that size, and on it a layer
running its own code (a family without a fused layout, an adapter, a quantized module) calls
`F.linear` as stock does. Each plain `nn.Linear` of a converted layer with a weight of at least
SPLIT_MIN_WEIGHT elements gets an instance `forward` (as accelerate sets one; no hook, which would
send every call through nn.Module's slow path) that computes such a call in pieces of the weight's
output rows (the same dot products: equal to `F.linear`, bit for bit on most shapes) and runs
`F.linear` itself on every other call. Measured on GTE-base, one 12-token query, 2 threads: 0.83x
of the time, outputs identical; 16 tokens: no change. The module's class, parameters and state_dict
stay stock; `revert()` removes the forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from bt_plugin.kernels import linear


class FewRowsForward:
    """The instance `forward` of one `nn.Linear`: `nn.Linear.forward`, a few rows in pieces."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Linear):
        self.module = module

    def __call__(self, input):
        module = self.module
        low, high = linear.SPLIT_ROWS
        if low <= input.numel() // module.in_features <= high:  # else as nn.Linear.forward, at once
            out = linear.few_rows_in_pieces(input, module.weight, module.bias)
            if out is not None:
                return out
        return F.linear(input, module.weight, module.bias)

    def __reduce__(self):  # pickle and deepcopy reach the module through their memo
        return (FewRowsForward, (self.module,))


def route(layer: nn.Module) -> None:
    """Give the layer's plain `nn.Linear` modules with a large weight a `FewRowsForward` (not those
    whose forward is already set on the instance)."""
    for module in layer.modules():
        if type(module) is nn.Linear and "forward" not in module.__dict__ \
                and module.weight.numel() >= linear.SPLIT_MIN_WEIGHT:
            module.__dict__["forward"] = FewRowsForward(module)


def unroute(layer: nn.Module) -> None:
    """Remove what `route` set (wherever the modules are now)."""
    for module in layer.modules():
        if isinstance(module.__dict__.get("forward"), FewRowsForward):
            del module.__dict__["forward"]
