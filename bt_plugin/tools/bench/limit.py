"""How close a forward comes to this machine's limit, for the benchmark's "of limit" column.

The work a padding-free forward cannot avoid is the real tokens' FLOPs: every `torch.nn.Linear` of
the encoder layers on every real token (2 * in * out each), plus attention within each sequence
(4 * length² * hidden per layer: the scores and the weighted sum; a position-bias term such as
DeBERTa's disentangled attention is not counted, so such a model's share reads low). The limit is the rate at which
this process multiplies matrices of the same shapes, measured just before the candidates are
timed, on the same threads, by the fastest route torch offers on this CPU: `F.linear` on plain
weights (the library torch picks for the dtype) and oneDNN's linear on weights reordered once into
its blocked layout (what an engine that prepares its weights ahead, as OpenVINO does, can reach),
each timed, the faster kept: the linears of one layer on `(real tokens of a batch, in)` inputs,
for every batch of the case (the layers of a model share their shapes).
"of limit" = (real FLOPs / a candidate's time) / that rate; attention, whose matrices are smaller,
is counted at the same rate, so 100 % is out of reach, and the stock candidates, which also compute
on padding, score their useful work only.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bt_plugin.kernels import torch_ops
from bt_plugin.kernels.linear import prepack_available


def encoder_linears(model: nn.Module, layer_paths: list[str]) -> Counter:
    """`{(in_features, out_features): count}` over every Linear inside the given encoder layers
    (an adapter's own linears included)."""
    shapes: Counter = Counter()
    for path in layer_paths:
        for module in model.get_submodule(path).modules():
            if isinstance(module, nn.Linear):
                shapes[(module.in_features, module.out_features)] += 1
    return shapes


def attention_width(config) -> int:
    """The width attention works at: the config's hidden size (`d_model` for T5)."""
    return getattr(config, "hidden_size", None) or config.d_model


def real_flops(linears: Counter, lengths: list[int], width: int, layers: int) -> float:
    """FLOPs of one forward over sequences of these real lengths (see the module docstring)."""
    per_token = sum(2 * i * o * n for (i, o), n in linears.items())
    return sum(lengths) * per_token + layers * sum(4 * length * length * width for length in lengths)


Route = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]  # (input, (in, out)) -> output


def linear_routes(weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Route]:
    """The ways this process can run a linear, by name: `F.linear` on the plain weights, and, where
    torch has oneDNN's packed linear, oneDNN on the weights reordered once, here (outside the timed
    sweeps: an engine packs its weights once, when it loads the model)."""
    routes: dict[str, Route] = {"F.linear": lambda x, key: F.linear(x, *weights[key])}
    if prepack_available():
        reorder, multiply = torch_ops.lookup(torch_ops.REORDER_LINEAR_WEIGHT), torch_ops.lookup(torch_ops.LINEAR_POINTWISE)
        packed = {key: (reorder(w), b) for key, (w, b) in weights.items()}
        routes["oneDNN packed"] = lambda x, key: multiply(x, *packed[key], "none", [], "")
    return routes


def route_seconds(route: Route, inputs: dict, linears: Counter, batch_tokens: list[int], repeats: int) -> float:
    """Seconds of one sweep through `route`: each batch's real tokens through every linear, as often
    as the layer has it; the median of `repeats` timed sweeps after one untimed one."""
    def sweep() -> float:
        start = time.perf_counter()
        for t in batch_tokens:
            for (i, o), n in linears.items():
                for _ in range(n):
                    route(inputs[(t, i)], (i, o))
        return time.perf_counter() - start

    with torch.inference_mode():
        sweep()
        return statistics.median(sweep() for _ in range(repeats))


def matmul_rate(linears: Counter, batch_tokens: list[int], repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest linear route (`linear_routes`) on one layer's shapes (`linears`, from
    `encoder_linears` of one layer) in `dtype`: every route is timed, the maximum kept, so that no
    engine beats the limit by choosing a route the limit did not time."""
    inputs = {(t, i): torch.randn(t, i, dtype=dtype) for t in set(batch_tokens) for i, _ in linears}
    weights = {(i, o): (torch.randn(o, i, dtype=dtype), torch.randn(o, dtype=dtype)) for i, o in linears}
    flops = sum(2 * t * i * o * n for t in batch_tokens for (i, o), n in linears.items())
    routes = linear_routes(weights)
    return max(flops / route_seconds(route, inputs, linears, batch_tokens, repeats) for route in routes.values())
