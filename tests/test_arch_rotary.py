"""Rotary, gated and RMSNorm encoders (patches/rotary.py): each layer runs its own stock code on the
packed real tokens (`layercode`), attention per sequence. Against stock transformers, realistic
width, saved and reloaded through from_pretrained."""

from __future__ import annotations

import copy
import functools
import inspect
import pickle

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.patches import rotary

import support

ATOL = 1e-5
SIZES = dict(vocab_size=support.VOCAB, hidden_size=256, num_attention_heads=4, intermediate_size=512,
             num_hidden_layers=3, max_position_embeddings=128)
TOKENS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
# model_type -> (config class, base model, task head, config overrides)
CASES = {
    "modernbert": ("ModernBertConfig", "ModernBertModel", "ModernBertForSequenceClassification",
                   dict(TOKENS, cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2, local_attention=8)),
    "gte": ("GteConfig", "GteModel", "GteForSequenceClassification", {}),
    "nomic_bert": ("NomicBertConfig", "NomicBertModel", "NomicBertForTokenClassification", {}),
    "jina_embeddings_v3": ("JinaEmbeddingsV3Config", "JinaEmbeddingsV3Model",
                           "JinaEmbeddingsV3ForQuestionAnswering", {}),
    "eurobert": ("EuroBertConfig", "EuroBertModel", "EuroBertForSequenceClassification",
                 dict(TOKENS, mask_token_id=4, num_key_value_heads=2)),
    "esm": ("EsmConfig", "EsmModel", "EsmForTokenClassification",
            dict(position_embedding_type="rotary", pad_token_id=1, mask_token_id=4)),
}
MODEL_TYPES = list(CASES)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_config(model_type: str, **overrides):
    config_class, _, _, extra = CASES[model_type]
    return getattr(transformers, config_class)(**{**SIZES, **extra, **overrides})


@pytest.fixture(scope="module")
def pairs():
    """`pairs(model_type, head=False)` -> (stock, converted), built once per module."""
    cache = {}

    def get(model_type: str, head: bool = False, kernel: str = "auto"):
        key = (model_type, head, kernel)
        if key not in cache:
            cls = getattr(transformers, CASES[model_type][2 if head else 1])
            cache[key] = support.stock_and_converted(cls, make_config(model_type), kernel)
        return cache[key]

    return get


def pad_id(model) -> int:
    return model.config.pad_token_id or 0


def batch(model, lengths: list[int], side: str = "right", seed: int = 0):
    ids, mask = support.padded_batch(lengths, seed=seed, pad_token=pad_id(model))
    return (ids.flip(1), mask.flip(1)) if side == "left" else (ids, mask)


def run_both(stock, converted, **inputs):
    before = [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(converted).layers]
    with torch.inference_mode():
        expected, actual = stock(**inputs), converted(**inputs)
    report = bt_plugin.explain(converted)
    assert report.layers
    for (f0, b0), layer in zip(before, report.layers):
        assert layer.fused_calls > f0 and layer.fallback_calls == b0 == 0, str(report)
        assert layer.kernel == "layercode" and layer.reason is None, str(report)
    return expected, actual


def close(want: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None) -> None:
    assert want.shape == got.shape
    diff = support.max_diff_on_real(want, got, mask if want.dim() >= 3 else None)
    assert diff <= ATOL, f"max abs diff {diff:.2e}"


def test_every_spec_resolves_its_layer_classes():
    for spec in rotary.SPECS:
        assert spec.attention_interface and not spec.has_fused_layout
    for spec in support.present(rotary.SPECS):
        assert len(spec.resolve_layer_classes()) == len(spec.layer_classes), spec.name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_converted_with_layer_code(model_type, pairs):
    _, converted = pairs(model_type)
    report = bt_plugin.explain(converted)
    assert report.family == model_type and report.reason is None
    assert len(report.layers) == SIZES["num_hidden_layers"] and all(layer.converted for layer in report.layers)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_batch(model_type, side, pairs):
    stock, converted = pairs(model_type)
    ids, mask = batch(stock, [30, 5, 17, 1, 12], side)  # a row of length 1 included
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    close(expected.last_hidden_state, actual.last_hidden_state, mask)
    if getattr(expected, "pooler_output", None) is not None:
        close(expected.pooler_output, actual.pooler_output, None)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_no_padding_and_batch_of_one(model_type, pairs):
    stock, converted = pairs(model_type)
    for lengths in ([20, 20, 20], [9]):
        ids, mask = batch(stock, lengths)
        expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
        close(expected.last_hidden_state, actual.last_hidden_state, None)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_hidden_states(model_type, pairs):
    stock, converted = pairs(model_type)
    ids, mask = batch(stock, [25, 6, 14])
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(expected.hidden_states) == len(actual.hidden_states) == SIZES["num_hidden_layers"] + 1
    for want, got in zip(expected.hidden_states, actual.hidden_states):
        close(want, got, mask)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_task_head(model_type, pairs):
    stock, converted = pairs(model_type, head=True)
    ids, mask = batch(stock, [30, 5, 17, 1])
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    reads_every = bt_plugin.explain(converted).padded_positions.startswith("computed as stock")
    for key, want in expected.items():
        if isinstance(want, torch.Tensor):
            close(want, actual[key], None if reads_every else mask)


@pytest.mark.parametrize("model_type", ["modernbert"])  # the conftest skips a family this transformers lacks
def test_sliding_window_layers_see_their_own_window(model_type, pairs):
    """ModernBERT's local layers attend within 4 tokens: sequences longer than the window."""
    stock, converted = pairs(model_type)
    assert "sliding_attention" in stock.config.layer_types
    ids, mask = batch(stock, [40, 11, 27], seed=3)
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    close(expected.last_hidden_state, actual.last_hidden_state, mask)


@pytest.mark.parametrize("model_type", ["gte"])  # the conftest skips a family this transformers lacks
def test_padding_is_removed_not_computed(model_type, pairs):
    stock, converted = pairs(model_type)
    ids, mask = batch(stock, [30, 5, 17])
    _, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    assert bool((actual.last_hidden_state[~mask.bool()] == 0).all())


@pytest.mark.parametrize("model_type", ["eurobert"])  # the conftest skips a family this transformers lacks
def test_training_mode_runs_stock(model_type, pairs):
    stock, converted = pairs(model_type)
    ids, mask = batch(stock, [12, 4])
    converted.train()
    try:
        with torch.no_grad():
            converted(input_ids=ids, attention_mask=mask)
        assert all("training mode" in layer.reason for layer in bt_plugin.explain(converted).layers)
    finally:
        converted.eval()


@pytest.mark.parametrize("model_type", ["modernbert"])  # the conftest skips a family this transformers lacks
def test_pickle_deepcopy_and_revert(model_type, pairs):
    # a pair of its own: after an output_hidden_states call transformers leaves hooks (local
    # functions) on the layers that no model, stock or converted, can pickle
    stock, converted = pairs(model_type, kernel="packed")
    ids, mask = batch(stock, [30, 5, 17])
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
    for clone in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        _, got = run_both(stock, clone, input_ids=ids, attention_mask=mask)
        close(want, got.last_hidden_state, mask)
    reverted = bt_plugin.revert(copy.deepcopy(converted))
    assert not bt_plugin.is_converted(reverted)
    assert not reverted._forward_pre_hooks and not reverted._forward_hooks and "forward" not in reverted.__dict__
    assert {k: v for k, v in reverted.state_dict().items()}.keys() == stock.state_dict().keys()


def _counting_packs(monkeypatch) -> list:
    from bt_plugin.kernels.layercode import LayerCodeKernel

    packs, pack = [], LayerCodeKernel.pack
    monkeypatch.setattr(LayerCodeKernel, "pack", lambda self, *a: packs.append(1) or pack(self, *a))
    return packs


@pytest.mark.parametrize("model_type", ["gte"])  # the conftest skips a family this transformers lacks
def test_a_model_that_runs_its_own_layer_loop_opens_its_frame_without_hooks(model_type, pairs, monkeypatch):
    """A `PreTrainedModel` running its layer loop itself gets an instance `forward` that opens the
    frame, not forward hooks (any hook sends every call through nn.Module's slow path): its layers
    are packed once per call, also when `model.forward(...)` is called directly (as
    sentence-transformers does), and `model.forward` keeps stock's signature."""
    stock, converted = pairs(model_type)
    assert not converted._forward_pre_hooks and not converted._forward_hooks
    assert inspect.signature(converted.forward) == inspect.signature(stock.forward)
    ids, mask = batch(stock, [30, 5, 17])
    packs = _counting_packs(monkeypatch)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        for call in (converted, converted.forward):
            packs.clear()
            close(want, call(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            assert len(packs) == 1, call


@pytest.mark.parametrize("model_type", ["gte"])
def test_a_forward_set_on_the_instance_before_conversion_still_runs_and_comes_back(model_type, pairs,
                                                                                   monkeypatch):
    """accelerate's hooks set `model.forward` on the instance; conversion runs it inside the frame,
    and revert puts it back."""
    stock, _ = pairs(model_type)
    model, calls = copy.deepcopy(stock), []
    own = functools.partial(lambda inner, *a, **k: calls.append(1) or inner(*a, **k), model.forward)
    model.forward = own
    bt_plugin.convert(model)
    ids, mask = batch(stock, [30, 5, 17])
    packs = _counting_packs(monkeypatch)
    with torch.inference_mode():
        close(stock(input_ids=ids, attention_mask=mask).last_hidden_state,
              model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert calls == [1] and len(packs) == 1
    bt_plugin.revert(model)
    assert model.__dict__["forward"] is own


@pytest.mark.parametrize("model_type", ["gte"])  # the conftest skips a family this transformers lacks
def test_an_exception_half_way_leaves_no_frame_behind(model_type, pairs):
    stock, converted = pairs(model_type)
    ids, mask = batch(stock, [30, 5, 17])
    layer = converted.layers[1]

    class Boom(torch.nn.Module):  # a module that raises half-way through the stack
        def forward(self, x):
            raise RuntimeError("boom")

    original, layer.mlp = layer.mlp, Boom()
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
            converted(input_ids=ids, attention_mask=mask)
    finally:
        layer.mlp = original
    from bt_plugin.dispatch.stack import _running

    assert _running.get() is None
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    close(expected.last_hidden_state, actual.last_hidden_state, mask)
