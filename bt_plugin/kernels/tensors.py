"""What every kernel takes: one encoder layer's tensors and constants (`LayerTensors`), and the
device/dtype reason each kernel reports when it cannot take the hidden states."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerTensors:
    """The tensors and constants of one encoder layer, in BetterTransformer's naming."""

    in_proj_weight: torch.Tensor
    in_proj_bias: torch.Tensor
    out_proj_weight: torch.Tensor
    out_proj_bias: torch.Tensor
    linear1_weight: torch.Tensor
    linear1_bias: torch.Tensor
    linear2_weight: torch.Tensor
    linear2_bias: torch.Tensor
    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    norm1_eps: float
    num_heads: int
    embed_dim: int
    norm_first: bool
    activation: str
    norm2_eps: float = 1e-5
    activation_fn: object = None
    layer_scale1: torch.Tensor | None = None
    layer_scale2: torch.Tensor | None = None
    attention_scale: float | None = None
    # the four matrix multiplies (bt_plugin.kernels.linear.Linears): on the plain weights above, or on
    # a derived copy (prepacked, or reduced precision) that bt_plugin.dispatch.derived holds
    linears: object = None
    # whether torch's fused encoder-layer kernel computes this layer exactly (fastpath's static rule):
    # the packed kernel hands it the sequences of a call where none is padded (see PackedKernel.layer)
    one_call: bool = False
    # the parameters the matrix weights above are read from (q/k/v's own, not only the fused view of
    # them): an in-place change of any of them (`load_state_dict`, `p.mul_()`) bumps its version,
    # which tells bt_plugin.dispatch.derived that a derived copy is stale
    sources: tuple = ()


def dtype_reason(name: str, dtypes: dict, hidden: torch.Tensor) -> str | None:
    served = dtypes.get(hidden.device.type)
    if served is None:
        return f"device was {hidden.device.type} ({name} serves {', '.join(dtypes)})"
    if hidden.dtype not in served:
        names = ", ".join(str(d).replace("torch.", "") for d in served)
        return f"dtype was {str(hidden.dtype).replace('torch.', '')} ({name} on {hidden.device.type} serves {names})"
    return None
