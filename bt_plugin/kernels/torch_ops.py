"""Every private PyTorch operator bt_plugin calls, looked up in one place.

Private operators change name, signature and behaviour between torch releases without notice (part of
what ended BetterTransformer). Each one is found here by name on the running torch and tried once, on
tiny tensors, with exactly the arguments the kernels pass. Where torch lacks one or the call fails,
`reason(name)` says so and the kernel that needs it is off: `fastpath` (its layers stay stock, `auto`
picks `packed`), the packed kernel's one-call layer (it runs op by op), the oneDNN linears (MKL's
`F.linear` instead) and the prepacked weights (the plain ones). The other kernels and the stock code
keep working; `bt_plugin.explain` and `doctor` show the reasons. Nothing is looked up at import.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


def _probe_encoder_layer(op: Callable) -> None:
    embed, heads = 4, 2
    w = lambda *shape: torch.zeros(*shape)  # noqa: E731
    op(torch.zeros(1, 2, embed), embed, heads, w(3 * embed, embed), w(3 * embed), w(embed, embed), w(embed),
       True, False, 1e-5, torch.ones(embed), w(embed), torch.ones(embed), w(embed),
       w(8, embed), w(8), w(embed, 8), w(embed), None, None)


def _probe_nested_from_mask(op: Callable) -> None:
    with warnings.catch_warnings():  # the once-per-process "nested tensors are a prototype" warning
        warnings.simplefilter("ignore")
        op(torch.zeros(1, 2, 4), torch.tensor([[True, False]]), mask_check=False).to_padded_tensor(0.0, (1, 2, 4))


def _probe_linear_pointwise(op: Callable) -> None:
    op(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(5), "none", [], "")


def _probe_linear_binary(op: Callable) -> None:
    op(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(5, 4), torch.zeros(5), "add")


def _probe_reorder(op: Callable) -> None:
    packed = op(torch.zeros(5, 4))
    _find(LINEAR_POINTWISE)(torch.zeros(3, 4), packed, torch.zeros(5), "gelu", [], "tanh")


ENCODER_LAYER = "torch._transformer_encoder_layer_fwd"
NESTED_FROM_MASK = "torch._nested_tensor_from_mask"
LINEAR_POINTWISE = "torch.ops.mkldnn._linear_pointwise"
LINEAR_POINTWISE_ADD = "torch.ops.mkldnn._linear_pointwise.binary"
REORDER_LINEAR_WEIGHT = "torch.ops.mkldnn._reorder_linear_weight"


@dataclass(frozen=True)
class PrivateOp:
    """One private operator: its dotted name, what stops working without it, and a probe that calls it
    as the kernels do."""

    name: str
    used_by: str
    probe: Callable[[Callable], None]
    needs_onednn: bool = False


OPS = {op.name: op for op in (
    PrivateOp(ENCODER_LAYER, "the fastpath kernel and the packed kernel's one-call layer", _probe_encoder_layer),
    PrivateOp(NESTED_FROM_MASK, "the fastpath kernel", _probe_nested_from_mask),
    PrivateOp(LINEAR_POINTWISE, "oneDNN linears and prepacked weights", _probe_linear_pointwise, needs_onednn=True),
    PrivateOp(LINEAR_POINTWISE_ADD, "prepacked weights", _probe_linear_binary, needs_onednn=True),
    PrivateOp(REORDER_LINEAR_WEIGHT, "prepacked weights", _probe_reorder, needs_onednn=True),
)}


def _find(name: str):
    target = torch
    for part in name.split(".")[1:]:
        try:
            target = getattr(target, part)
        except (AttributeError, RuntimeError):  # torch.ops namespaces raise RuntimeError for unknown ops
            return None
    return target


@functools.cache
def reason(name: str) -> str | None:
    """Why the kernels cannot call this private operator on the running torch (missing, or its probe
    call with the kernels' arguments failed), or None when they can. Cached per process; `forget()`
    clears it (tests that monkeypatch torch)."""
    op = OPS[name]
    if op.needs_onednn and not torch.backends.mkldnn.is_available():
        return f"this torch build has no oneDNN ({name}; {op.used_by} off)"
    found = _find(name)
    if found is None:
        return f"torch {torch.__version__} has no {name} ({op.used_by} off)"
    try:
        op.probe(found)
    except Exception as error:  # a changed signature or behaviour: whatever the op raised
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        return (f"torch {torch.__version__}'s {name} failed a call with the arguments bt_plugin passes "
                f"({type(error).__name__}: {first}; {op.used_by} off)")
    return None


def available(*names: str) -> bool:
    """Whether every named private operator is usable on the running torch."""
    return all(reason(name) is None for name in names)


def first_reason(*names: str) -> str | None:
    """The first of these operators' reasons, or None when all are usable."""
    return next((r for r in map(reason, names) if r is not None), None)


@functools.cache
def lookup(name: str) -> Callable:
    """The operator itself, found once (raises if it is missing: ask `available` first)."""
    found = _find(name)
    if found is None:
        raise AttributeError(reason(name) or f"{name} is missing")
    return found


def unavailable() -> list[str]:
    """The reasons of every private operator the running torch cannot serve (empty when all can)."""
    return [r for r in map(reason, OPS) if r is not None]


def forget() -> None:
    """Look every operator up again at next use (after a test monkeypatched torch)."""
    reason.cache_clear()
    lookup.cache_clear()
