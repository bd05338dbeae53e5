"""Masks users build themselves (holes in a row, empty rows, an all-padding batch) and the kernel
choices that cannot serve a family: exact against stock, or stock with the reason. Each case is
one the property tests over every family (tests/test_fuzz_families.py) found wrong or crashing."""

from __future__ import annotations

import pytest
import torch

import bt_plugin
from bt_plugin.kernels.binned import BINNED
from bt_plugin.loading import registry

import families
import support

ATOL = 1e-5
BINNED_MODEL_TYPES = [model_type for spec in registry.all_specs().values() if spec.binned
                      for model_type in spec.model_types]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_pair(model_type: str, head: str = "base", kernel: str = "auto", family: str | None = None):
    config = families.example_config(model_type, family)
    return support.stock_and_converted(families.model_classes(config)[head], config, kernel)


def holes_mask() -> torch.Tensor:
    """Four rows with holes, short enough that first-fit puts several sequences in one bin."""
    mask = torch.zeros(4, 40, dtype=torch.long)
    mask[0, [0, 1, 4, 9, 10, 11, 17]] = 1
    mask[1, [3, 5, 6, 7]] = 1
    mask[2, 25:39:2] = 1
    mask[3, [0, 8]] = 1
    return mask


def run(stock, converted, **inputs):
    before = [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(converted).layers]
    with torch.inference_mode():
        want, got = stock(**inputs), converted(**inputs)
    report = bt_plugin.explain(converted)
    calls = [(layer.fused_calls - f0, layer.fallback_calls - b0)
             for (f0, b0), layer in zip(before, report.layers)]
    return want, got, report, calls


@pytest.mark.parametrize("model_type", BINNED_MODEL_TYPES)
def test_binned_families_are_exact_on_masks_with_holes(model_type):
    """Distances across a hole are stock's: a bin holds a sequence's whole span, holes masked."""
    stock, converted = load_pair(model_type)
    mask = holes_mask()
    ids = torch.randint(5, stock.config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, attention_mask=mask)
    if families.is_seq2seq(stock):
        inputs.update(decoder_input_ids=torch.zeros(4, 3, dtype=torch.long), use_cache=False)
    want, got, report, calls = run(stock, converted, **inputs)
    served = [(layer, call) for layer, call in zip(report.layers, calls) if layer.converted]
    assert served and all(layer.kernel == "binned" and call == (1, 0) for layer, call in served), str(report)
    name = "encoder_last_hidden_state" if families.is_seq2seq(stock) else "last_hidden_state"
    real = mask.bool()
    assert (want[name] - got[name])[real].abs().max().item() <= ATOL
    if families.is_seq2seq(stock):  # the decoder reads the encoder under the same mask
        assert (want.last_hidden_state - got.last_hidden_state).abs().max().item() <= ATOL


def test_a_bin_keeps_each_span_whole_and_unpacks_real_tokens_only():
    mask = holes_mask().bool()
    hidden = torch.randn(4, 40, 8)
    carrier, state = BINNED.pack(hidden, mask)
    assert carrier.shape[0] < 4  # spans 18, 5, 13 and 9 slots share rows
    for row in range(4):
        real = mask[row].nonzero().squeeze(1)
        slots = state.dst[state.src // 40 == row]
        positions = state.src[state.src // 40 == row] % 40
        assert torch.equal(positions, torch.arange(int(real[0]), int(real[-1]) + 1))  # the whole span
        assert bool((slots - positions == slots[0] - positions[0]).all())  # one shift: i - j unchanged
    back = BINNED.unpack(carrier, state)
    assert torch.equal(back[mask], hidden[mask]) and bool((back[~mask] == 0).all())  # holes are zeros


def test_layercode_choice_on_a_family_with_its_own_attention_stays_stock_with_the_reason():
    """MPNet's attention is its own code with a score bias: `kernel="layercode"` cannot serve it
    (it raised AttributeError on the first call)."""
    stock, converted = load_pair("mpnet", kernel="layercode")
    assert not bt_plugin.is_converted(converted)
    report = bt_plugin.explain(converted, kernel="layercode")
    assert all("compute attention with their own code" in layer.reason for layer in report.layers), str(report)
    with pytest.raises(ValueError, match="compute attention with their own code"):
        bt_plugin.convert(converted, kernel="layercode")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.randint(5, 1000, mask.shape, generator=torch.Generator().manual_seed(0))
    want, got, _, _ = run(stock, converted, input_ids=ids, attention_mask=mask)
    assert torch.equal(want.last_hidden_state, got.last_hidden_state)


@pytest.mark.parametrize(("model_type", "kernel"),
                         [("modernbert", "auto"), ("modernbert", "layercode"), ("bert", "layercode"), ("bert", "packed")])
def test_a_batch_without_a_real_token(model_type, kernel):
    """It crashed the layer-code path (rotary families; `kernel="layercode"` elsewhere): that path
    runs stock with the reason. `packed` computes it (nothing to attend, the pooler's rows as stock)."""
    stock, converted = load_pair(model_type, kernel=kernel)
    ids, mask = torch.randint(5, 1000, (1, 6)), torch.zeros(1, 6, dtype=torch.long)
    want, got, report, calls = run(stock, converted, input_ids=ids, attention_mask=mask)
    if kernel == "packed":  # transformers 4.x hands an additive mask: stock attends uniformly there
        assert all(call == (1, 0) or "no real token under an additive mask" in layer.reason
                   for layer, call in zip(report.layers, calls)), str(report)
        assert (want.pooler_output - got.pooler_output).abs().max().item() <= ATOL
        return
    assert torch.equal(want.last_hidden_state, got.last_hidden_state)
    assert all(call == (0, 1) for call in calls)
    assert all("no row of the attention mask had a real token" in layer.reason for layer in report.layers)


@pytest.mark.parametrize("model_type", ["fsmt", "bart"])
def test_an_encoder_decoder_reads_a_row_without_real_tokens(model_type):
    """The decoder cross-attends every encoder position of an empty row: those rows are computed
    as stock (sdpa's boolean mask: the fused kernel attends as stock does), or the call runs stock
    with the reason (a legacy layer's own key-padding mask)."""
    stock, converted = load_pair(model_type)
    assert "row has no real token" in bt_plugin.explain(converted).padded_positions
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    ids = torch.randint(5, 1000, mask.shape, generator=torch.Generator().manual_seed(0))
    decoder = dict(decoder_input_ids=torch.full((2, 3), stock.config.decoder_start_token_id), use_cache=False)
    want, got, report, calls = run(stock, converted, input_ids=ids, attention_mask=mask, **decoder)
    assert (want.last_hidden_state - got.last_hidden_state).abs().max().item() <= ATOL
    assert (want.encoder_last_hidden_state - got.encoder_last_hidden_state).abs().max().item() <= ATOL
    encoder = [(layer, call) for layer, call in zip(report.layers, calls) if layer.converted]
    if model_type == "fsmt":
        assert all(call == (0, 1) and "own key-padding mask" in layer.reason for layer, call in encoder), str(report)
    else:  # transformers 4.x hands BART's layers an additive mask: stock attends uniformly there
        assert all(call == (1, 0) or "no real token under an additive mask" in layer.reason
                   for layer, call in encoder), str(report)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])  # no empty row: padding-free, zeros there
    want, got, report, calls = run(stock, converted, input_ids=ids, attention_mask=right, **decoder)
    assert (want.last_hidden_state - got.last_hidden_state).abs().max().item() <= ATOL
    assert all(call == (1, 0) for layer, call in zip(report.layers, calls) if layer.converted), str(report)


def test_altclip_text_tower_reads_its_first_position():
    """AltCLIP's text tower pools its first position without a `pooler` module."""
    stock, converted = load_pair("altclip_text_model", family="bert_layout")
    assert "first position" in bt_plugin.explain(converted).padded_positions
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # left padding
    ids = torch.randint(5, 1000, mask.shape, generator=torch.Generator().manual_seed(0))
    want, got, _, calls = run(stock, converted, input_ids=ids, attention_mask=mask)
    assert (want.pooler_output - got.pooler_output).abs().max().item() <= ATOL
    assert all(call == (1, 0) for call in calls)


def test_the_example_builder_makes_every_family():
    """tests/families.py builds a converted model of every registered family (so the property
    tests really cover each); a family it cannot build fails here, naming it."""
    failures = {}
    for name, spec in registry.all_specs().items():
        try:
            config = families.example_config(spec.model_types[0], name)
            model = bt_plugin.convert(families.model_classes(config)["base"](config).eval())
            assert bt_plugin.explain(model).family == name
        except Exception as error:  # collect them all: one message naming every family
            failures[name] = f"{type(error).__name__}: {error}"
    assert not failures, failures
