"""`fastpath`: PyTorch's fused encoder-layer kernel (`torch._transformer_encoder_layer_fwd`, the
BetterTransformer kernel) on nested tensors of each row's real tokens."""

from __future__ import annotations

import torch

from bt_plugin.kernels import torch_ops
from bt_plugin.kernels.tensors import LayerTensors, dtype_reason

class FastpathKernel:
    """PyTorch's fused encoder-layer kernel on nested tensors (the BetterTransformer path)."""

    name = "fastpath"
    # the private operators it calls (bt_plugin.kernels.torch_ops looks them up and tries them once;
    # their probe also takes, silenced, torch's once-per-process warning that strided nested tensors
    # are a prototype, which would otherwise land in the user's first forward)
    private_ops = (torch_ops.ENCODER_LAYER, torch_ops.NESTED_FROM_MASK)
    keeps_padded_rows = False
    activations = ("gelu", "relu")
    dtypes = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.float16, torch.bfloat16)}
    right_padded_only = True

    def static_reason(self, *, activation: str, num_heads: int, norm1_eps: float, norm2_eps: float,
                      has_biases: bool, plain_residuals: bool = True, score_bias: bool = False) -> str | None:
        """Why this kernel can never serve a layer of this structure (or on this torch), or None."""
        missing = torch_ops.first_reason(*self.private_ops)
        if missing:
            return missing
        if score_bias:
            return "the layer adds a relative position bias to the attention scores (fastpath cannot)"
        if not plain_residuals:
            return "the layer scales its residual branches or attention scores (fastpath cannot)"
        if activation not in self.activations:
            return f"activation was {activation} (fastpath computes {', '.join(self.activations)})"
        if num_heads % 2 == 1:
            return f"num_heads was {num_heads} (odd; PyTorch's fused kernel needs an even count)"
        if norm1_eps != norm2_eps:
            return f"layer norm eps differed ({norm1_eps} and {norm2_eps}; the kernel takes one)"
        if not has_biases:
            return "a projection or layer norm had no bias or weight (the fused kernel needs them all)"
        return None

    def input_reason(self, hidden: torch.Tensor) -> str | None:
        """Why this kernel cannot take these hidden states (device, dtype), or None."""
        reason = dtype_reason(self.name, self.dtypes, hidden)
        if reason is None and not torch.backends.mha.get_fastpath_enabled():
            reason = "torch.backends.mha.get_fastpath_enabled() was False"
        if reason is None and torch.is_autocast_enabled(hidden.device.type):
            reason = (f"autocast was enabled on {hidden.device.type} (fastpath's fused kernel computes in its "
                      "weights' dtype; packed computes what stock computes under autocast)")
        return reason

    def pack(self, hidden: torch.Tensor, keep: torch.Tensor | None):
        """`(carrier, state)`: a nested tensor of each (right-padded) row's real tokens."""
        if keep is None:
            return hidden, None
        return torch_ops.lookup(torch_ops.NESTED_FROM_MASK)(hidden, keep, mask_check=False), tuple(hidden.shape)

    def unpack(self, carrier: torch.Tensor, state) -> torch.Tensor:
        """Restore the `(B, L, E)` layout; padded positions are zeros."""
        return carrier if state is None else carrier.to_padded_tensor(0.0, state)

    def layer(self, hidden: torch.Tensor, t: LayerTensors, state=None) -> torch.Tensor:
        """One encoder layer on nested (or unpadded dense) hidden states."""
        return torch_ops.lookup(torch_ops.ENCODER_LAYER)(
            hidden, t.embed_dim, t.num_heads,
            t.in_proj_weight, t.in_proj_bias, t.out_proj_weight, t.out_proj_bias,
            t.activation == "gelu", t.norm_first, t.norm1_eps,
            t.norm1_weight, t.norm1_bias, t.norm2_weight, t.norm2_bias,
            t.linear1_weight, t.linear1_bias, t.linear2_weight, t.linear2_bias,
            None, None,
        )
