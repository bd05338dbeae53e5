"""Under `torch.autocast("cpu", dtype=torch.bfloat16)` every registered family runs its converted
layers padding-free, with no fallback, and computes what stock computes under the same autocast;
`precision="bf16"` computes the same with float32 in and out.

The models come from transformers' own configs (tests/families.py), saved and loaded back through
`from_pretrained`; the family list is read from the registry, so a new family is covered here
without editing this module. bf16 keeps 8 bits of mantissa: stock and converted round in a
different order (one fused QKV matmul, per-sequence attention), so the comparison is within
bf16's tolerance per token, and by the cosine of mean-pooled outputs, not to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import bt_plugin
from bt_plugin.loading import registry

import families

CASES = [(family, model_type) for family, spec in sorted(registry.all_specs().items()) for model_type in spec.model_types]
# Per token: the difference, relative to the size of the stock vector at that position (bf16's
# unit roundoff is 2 ** -8 = 0.0039; a few layers of it in either order).
TOKEN_TOLERANCE = 0.05
POOLED_COSINE = 0.9999

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(family: str, model_type: str, directory, **convert):
    config = families.example_config(model_type, family)
    cls = families.model_classes(config)["base"]
    torch.manual_seed(0)
    cls(config).save_pretrained(directory)
    stock = cls.from_pretrained(directory).eval()
    with bt_plugin.enabled(**convert):
        converted = cls.from_pretrained(directory).eval()
    return stock, converted


def _compare(stock, converted, inputs: dict, mask, want, got, same_dtype: bool = True) -> None:
    """Every floating output the model reads: same dtype (`same_dtype`) and shape, each read position within
    TOKEN_TOLERANCE of stock's, and the mean-pooled per-row cosine at least POOLED_COSINE."""
    wanted, gotten = dict(families.output_tensors(want)), dict(families.output_tensors(got))
    assert wanted.keys() == gotten.keys()
    every = (bt_plugin.explain(converted).padded_positions or "").startswith("computed as stock")
    for name, expected in wanted.items():
        actual = gotten[name]
        assert actual.shape == expected.shape, name
        assert actual.dtype == expected.dtype or not same_dtype, f"{name}: {actual.dtype}, stock {expected.dtype}"
        if expected.dim() < 3 or expected.shape[0] != actual.shape[0] or not expected.numel():
            continue
        read = families.read_positions(stock, inputs, mask, name, expected, every)
        if read is None:
            read = torch.ones(expected.shape[:2], dtype=torch.bool)
        expected, actual = expected.float().flatten(2), actual.float().flatten(2)
        scale = expected.norm(dim=-1).clamp_min(1e-3)
        relative = ((actual - expected).norm(dim=-1) / scale)[read]
        assert relative.max().item() <= TOKEN_TOLERANCE, f"{name}: per-token relative diff {relative.max():.3g}"
        weights = read[..., None].float()
        pooled = [(t * weights).sum(1) / weights.sum(1).clamp_min(1) for t in (expected, actual)]
        rows = read.any(dim=1)
        cosine = torch.nn.functional.cosine_similarity(pooled[0][rows], pooled[1][rows], dim=-1)
        assert cosine.min().item() >= POOLED_COSINE, f"{name}: pooled cosine {cosine.min():.6f}"


def _calls(converted) -> list[tuple[int, int]]:
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(converted).layers]


def _run_both(stock, converted, inputs: dict, context):
    """`(want, got)` under `context`, and assert the converted layers took, for this call, the
    path they take for it without autocast: fused where fp32 is fused (no autocast fallback),
    stock with the same reason where fp32 falls back (a causal text tower, say)."""
    with torch.inference_mode():
        start = _calls(converted)
        converted(**inputs)
        plain = bt_plugin.explain(converted)
        middle = _calls(converted)
        with context():
            try:
                want = stock(**inputs)
            except RuntimeError as error:  # stock's own code cannot run under autocast (DeBERTa v1)
                with pytest.raises(type(error)):
                    converted(**inputs)
                return None, None
            got = converted(**inputs)
    report = bt_plugin.explain(converted)
    for layer, was, fp32, now, end in zip(report.layers, plain.layers, start, middle, _calls(converted)):
        if not layer.converted:
            continue
        fell_back_fp32, fell_back = now[1] > fp32[1], end[1] > now[1]
        assert fell_back == fell_back_fp32, f"{layer.path}: {layer.reason}\n{report}"
        assert layer.reason == was.reason, f"{layer.path}: {layer.reason} (fp32: {was.reason})\n{report}"
        assert layer.precision == "bf16 (autocast)", f"{layer.path} computed in {layer.precision}\n{report}"
    return want, got


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("family,model_type", CASES)
def test_every_family_under_autocast_runs_fused_and_matches_stock_under_autocast(family, model_type, tmp_path):
    stock, converted = _load(family, model_type, tmp_path)
    for kind in ("right", "holes"):
        inputs, mask = families.example_inputs(stock, kind, [9, 4, 6], 9, seed=1)
        want, got = _run_both(stock, converted, inputs, _autocast)
        if want is not None:
            _compare(stock, converted, inputs, mask, want, got)


def _layers_under_autocast(stock, converted) -> None:
    """Make `stock` compute its encoder layers (those `converted` converted) under autocast bf16,
    handing back their hidden states in the dtype they came in: what `precision="bf16"` promises."""
    for layer in bt_plugin.explain(converted).layers:
        if not layer.converted:
            continue
        module = stock.get_submodule(layer.path)

        def forward(hidden_states, *args, _stock=module.forward, **kwargs):
            with _autocast():
                out = _stock(hidden_states, *args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            if first.dtype != hidden_states.dtype:
                first = first.to(hidden_states.dtype)
                out = (first,) + tuple(out[1:]) if isinstance(out, tuple) else first
            return out

        module.forward = forward


@pytest.mark.parametrize("family,model_type", CASES)
def test_precision_bf16_computes_its_layers_as_autocast_does_with_the_loaded_dtype_outside(family, model_type, tmp_path):
    stock, converted = _load(family, model_type, tmp_path, precision="bf16")
    inputs, mask = families.example_inputs(stock, "right", [9, 4, 6], 9, seed=2)
    with torch.inference_mode():
        loaded = stock(**inputs)
        _layers_under_autocast(stock, converted)
        try:
            want = stock(**inputs)
        except RuntimeError:  # stock's layer code cannot run under autocast (DeBERTa v1): as loaded
            want = loaded
        got = converted(**inputs)
    # the interface the user loaded: every output in the dtype the fp32 model returns
    _compare(stock, converted, inputs, mask, want, got, same_dtype=True)
    report = bt_plugin.explain(converted)
    for layer in report.layers:
        if layer.converted and not layer.reason:
            assert layer.fused_calls and layer.precision.startswith("bf16" if want is not loaded else "fp32 (its code raised"), (
                f"{layer.path} computed in {layer.precision}\n{report}")
