"""The compute kernels behind a fused layer.

`fastpath` is PyTorch's fused encoder-layer kernel (`torch._transformer_encoder_layer_fwd`, the
BetterTransformer kernel) run on nested tensors: padding is dropped when the stack's first layer
nests the hidden states from the key-padding mask and restored once after the last layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


def _consume_nested_prototype_warning() -> None:
    """torch warns once per process that strided nested tensors are a prototype. That is the API
    the fused kernel takes, so the warning tells users nothing they can act on: trigger it here,
    silenced, instead of in the user's first forward (without touching global warning filters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._nested_tensor_from_mask(torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))


_consume_nested_prototype_warning()


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


class FastpathKernel:
    """PyTorch's fused encoder-layer kernel on nested tensors (the BetterTransformer path)."""

    name = "fastpath"
    activations = ("gelu", "relu")
    dtypes = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.float16, torch.bfloat16)}
    right_padded_only = True

    def static_reason(self, *, activation: str, num_heads: int, norm1_eps: float, norm2_eps: float,
                      has_biases: bool) -> str | None:
        """Why this kernel can never serve a layer of this structure, or None."""
        if activation not in self.activations:
            return f"activation was {activation} (fastpath computes {', '.join(self.activations)})"
        if num_heads % 2 == 1:
            return f"num_heads was {num_heads} (odd; PyTorch's fused kernel needs an even count)"
        if norm1_eps != norm2_eps:
            return f"layer norm eps differed ({norm1_eps} and {norm2_eps}; the kernel takes one)"
        if not has_biases:
            return "a projection had no bias (the fused kernel needs every bias)"
        return None

    def input_reason(self, hidden: torch.Tensor) -> str | None:
        """Why this kernel cannot take these hidden states (device, dtype), or None."""
        served = self.dtypes.get(hidden.device.type)
        if served is None:
            return f"device was {hidden.device.type} (fastpath serves {', '.join(self.dtypes)})"
        if hidden.dtype not in served:
            names = ", ".join(str(d).replace("torch.", "") for d in served)
            return f"dtype was {str(hidden.dtype).replace('torch.', '')} (fastpath on {hidden.device.type} serves {names})"
        if not torch.backends.mha.get_fastpath_enabled():
            return "torch.backends.mha.get_fastpath_enabled() was False"
        return None

    def pack(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Drop padding: a nested tensor of the real tokens of each (right-padded) row."""
        return torch._nested_tensor_from_mask(hidden, keep, mask_check=False)

    def unpack(self, packed: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """Restore the `(B, L, E)` layout; padded positions are zeros."""
        return packed.to_padded_tensor(0.0, (batch, length, packed.size(-1)))

    def is_packed(self, hidden: torch.Tensor) -> bool:
        return hidden.is_nested

    def layer(self, hidden: torch.Tensor, t: LayerTensors) -> torch.Tensor:
        """One encoder layer on nested (or unpadded dense) hidden states."""
        return torch._transformer_encoder_layer_fwd(
            hidden, t.embed_dim, t.num_heads,
            t.in_proj_weight, t.in_proj_bias, t.out_proj_weight, t.out_proj_bias,
            t.activation == "gelu", t.norm_first, t.norm1_eps,
            t.norm1_weight, t.norm1_bias, t.norm2_weight, t.norm2_bias,
            t.linear1_weight, t.linear1_bias, t.linear2_weight, t.linear2_bias,
            None, None,
        )


KERNELS = {"fastpath": FastpathKernel()}
# What "auto" picks per device type; see docs and the benchmark for the measurements behind it.
AUTO_KERNEL = {"cpu": "fastpath", "cuda": "fastpath"}
KERNEL_CHOICES = ("auto", *KERNELS)


def check_kernel_name(name: str) -> str:
    """Return `name` if it is a valid kernel choice, else raise a ValueError listing them."""
    if name not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel {name!r}; valid kernels: {', '.join(KERNEL_CHOICES)}")
    return name


def resolve_kernel_name(name: str, device_type: str) -> str:
    """The concrete kernel for a choice on a device (`auto` looks up AUTO_KERNEL)."""
    check_kernel_name(name)
    return AUTO_KERNEL.get(device_type, "fastpath") if name == "auto" else name


def get_kernel(name: str) -> FastpathKernel:
    """The kernel registered under a concrete name."""
    return KERNELS[check_kernel_name(name)]
