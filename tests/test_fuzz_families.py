"""Property-based, over every registered family: converted equals stock wherever the model reads
it, or the call falls back with a reason; never a wrong output.

The families are listed from the registry (a family added to it is fuzzed without editing this
module); each gets a few examples per run. Hypothesis draws the family's model type, a head (or
the base model), the kernel choice (`packed`, `fastpath`, `layercode`, or `auto`, which also
reaches `binned` and the padded rows kept for heads that read them), whether the matrix weights
are prepacked (`prepack=True`: oneDNN's layout, activation and residual fused), the batch, the length, the
mask (right, left, holes, none, an empty row) and whether hidden states are asked for. Each run
draws new examples; a failure prints the example and the `@reproduce_failure` line that replays it.
The models come from transformers' own configs (tests/families.py), saved and loaded back through
`from_pretrained`. `BT_PLUGIN_FUZZ_EXAMPLES` sets the examples per family.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bt_plugin
from bt_plugin.dispatch import stock_linears
from bt_plugin.dispatch.layer import FusedLayer
from bt_plugin.kernels import linear
from bt_plugin.loading import registry

import families

ATOL = 1e-5
FAMILIES = sorted(registry.all_specs())
KERNELS = ("auto", "packed", "fastpath", "layercode")
MASK_KINDS = ("right", "left", "holes", "full", "empty_row")
# CI's budget: a few examples per family per run, new ones each run (more: BT_PLUGIN_FUZZ_EXAMPLES=200)
EXAMPLES_PER_FAMILY = int(os.environ.get("BT_PLUGIN_FUZZ_EXAMPLES", "10"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    """`models(family, model_type, head, kernel, prepack)` -> (stock, converted), each saved once and
    loaded back with `from_pretrained`, stock and under `enabled(kernel=..., prepack=...)`; the saved
    checkpoints are deleted when the module's tests end."""
    root = tempfile.TemporaryDirectory(prefix="fuzz-")
    saved: dict[tuple, tuple[type, str]] = {}
    loaded: dict[tuple, tuple] = {}

    def get(family: str, model_type: str, head: str, kernel: str, prepack: bool = False):
        key = (family, model_type, head)
        if key not in saved:
            config = families.example_config(model_type, family)
            cls = families.model_classes(config)[head]
            torch.manual_seed(0)
            directory = tempfile.mkdtemp(prefix=f"{model_type}-", dir=root.name)
            cls(config).save_pretrained(directory)
            saved[key] = (cls, directory)
        if key + (kernel, prepack) not in loaded:
            cls, directory = saved[key]
            stock = cls.from_pretrained(directory).eval()
            with bt_plugin.enabled(kernel=kernel, prepack=prepack):
                converted = cls.from_pretrained(directory).eval()
            loaded[key + (kernel, prepack)] = (stock, converted)
        return loaded[key + (kernel, prepack)]

    with root:
        yield get


@st.composite
def cases(draw, family: str):
    spec = registry.all_specs()[family]
    batch = draw(st.integers(1, 6))
    width = draw(st.integers(1, 40))
    return dict(
        model_type=draw(st.sampled_from(spec.model_types)),
        head=draw(st.sampled_from(("base",) + families.HEADS)),
        kernel=draw(st.sampled_from(KERNELS)),
        prepack=draw(st.booleans()),
        kind=draw(st.sampled_from(MASK_KINDS)),
        lengths=draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch)),
        width=width,
        hidden_states=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _layer_calls(model) -> list[tuple[int, int]]:
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=EXAMPLES_PER_FAMILY, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_family_equals_stock_or_falls_back_with_a_reason(family, models, data, monkeypatch):
    monkeypatch.setattr(linear, "ONEDNN_MIN_WEIGHT", 0)  # prepack=True prepacks these small layers too
    # ... and 4-15 real tokens multiply these small weights in several pieces (linear.SPLIT_ROWS)
    monkeypatch.setattr(linear, "SPLIT_MIN_WEIGHT", 0)
    monkeypatch.setattr(linear, "SPLIT_PIECE", 256)
    case = data.draw(cases(family))
    config = families.example_config(case["model_type"], family)
    heads = families.model_classes(config)
    head = case["head"] if case["head"] in heads else "base"
    stock, converted = models(family, case["model_type"], head, case["kernel"], case["prepack"])
    for layer in converted.modules():  # the layers' own linears take the pieces too, where their code runs
        if isinstance(layer, FusedLayer):
            stock_linears.route(layer)
    report = bt_plugin.explain(converted)
    assert report.family == family, (
        f"the example {case['model_type']} model converted as {report.family!r}, not {family!r}: "
        "give tests/families.py FAMILY_OVERRIDES for it")
    inputs, mask = families.example_inputs(stock, case["kind"], case["lengths"], case["width"], case["seed"])
    if case["hidden_states"]:
        inputs["output_hidden_states"] = True
    before = _layer_calls(converted)
    with torch.inference_mode():
        want = stock(**inputs)
        got = converted(**inputs)
    report = bt_plugin.explain(converted)
    every = (report.padded_positions or "").startswith("computed as stock")
    wanted, gotten = dict(families.output_tensors(want)), dict(families.output_tensors(got))
    assert wanted.keys() == gotten.keys()
    for name, expected in wanted.items():
        actual = gotten[name]
        assert actual.shape == expected.shape, name
        read = families.read_positions(stock, inputs, mask, name, expected, every)
        if read is not None:
            expected, actual = expected[read], actual[read]
        if expected.numel():  # NaN where stock gives NaN (a row with no real token, both run stock)
            diff = (expected - actual).abs().masked_fill(expected.isnan() & actual.isnan(), 0).max().item()
            assert diff <= ATOL, f"{name}: max abs diff {diff:.2e} on what the model reads\n{report}"
    for (fused0, fallback0), layer in zip(before, report.layers):
        if layer.fallback_calls > fallback0:
            assert layer.reason, f"{layer.path} fell back with no reason\n{report}"
        elif layer.converted:
            assert layer.fused_calls > fused0, f"{layer.path} neither ran fused nor fell back\n{report}"
