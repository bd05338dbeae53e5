"""Decoder-only backbones used as encoders (Qwen, Llama, Mistral, Gemma, Phi-3, Granite, OLMo 2,
SmolLM3, ModernBERT-decoder): converted vs stock on the same weights.

Every family registered with `fills_cache` (listed from the registry) is built from transformers'
own config (tests/families.py), saved and loaded back with `from_pretrained`. Left and right
padding (a length-1 row), a batch of one, an unpadded batch; called with the default cache (the
model makes a fresh one), `use_cache=False` and `use_cache=True`: equal on real tokens within
1e-5, every layer on `layercode` with no fallback. The returned cache holds stock's keys and values
at the real positions, so `generate()` continues as stock does; a causal LM's logits
(`logits_to_keep=1` and full) and a classifier's logits equal stock's.
"""

from __future__ import annotations

import pytest
import torch

import bt_plugin
from bt_plugin.loading import registry

import families

ATOL = 1e-5
DECODERS = sorted({model_type for spec in registry.all_specs().values() if spec.fills_cache
                   for model_type in spec.model_types})
# (model type, config overrides): a short sliding window, and Gemma 3 bidirectional (EmbeddingGemma)
WINDOWED = [("mistral", dict(sliding_window=3)), ("qwen3", dict(sliding_window=3, use_sliding_window=True)),
            ("gemma3_text", dict(sliding_window=3)), ("gemma3_text", dict(sliding_window=3, use_bidirectional_attention=True)),
            ("gemma2", dict(sliding_window=3))]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(tmp_path, model_type: str, head: str = "base", **overrides):
    config = families.example_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    if "sliding_window" in overrides and hasattr(config, "layer_types"):
        config.layer_types = ["sliding_attention", "full_attention"][: config.num_hidden_layers]
    cls = families.model_classes(config)[head]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    stock = cls.from_pretrained(tmp_path).eval()
    with bt_plugin.enabled():
        converted = cls.from_pretrained(tmp_path).eval()
    return stock, converted


def _masks():
    ids = torch.randint(5, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 0, 1]])
    right = left.flip(1)
    return [("left", ids, left), ("right", ids, right), ("one row", ids[:1], left[:1]),
            ("unpadded", ids, torch.ones_like(left))]


def _calls(model):
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def _assert_fused(model, before):
    report = bt_plugin.explain(model)
    for layer, (fused, fallback) in zip(report.layers, before):
        assert layer.converted and layer.fallback_calls == fallback, f"{layer.path}: {layer.reason}\n{report}"
        assert layer.fused_calls > fused and layer.kernel == "layercode", report


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_equals_stock_padding_free_with_and_without_a_cache(model_type, tmp_path):
    stock, converted = _load(tmp_path, model_type)
    for name, ids, mask in _masks():
        for cache in ({}, {"use_cache": False}, {"use_cache": True}):
            before = _calls(converted)
            with torch.inference_mode():
                want = stock(input_ids=ids, attention_mask=mask, **cache).last_hidden_state
                got = converted(input_ids=ids, attention_mask=mask, **cache).last_hidden_state
            real = mask.bool()
            diff = (want - got)[real].abs().max().item()
            assert diff <= ATOL, f"{name} {cache}: {diff:.2e}"
            _assert_fused(converted, before)


def _layer_states(cache, index: int):
    layer = cache.layers[index] if hasattr(cache, "layers") else None
    if layer is not None:
        return layer.keys, layer.values
    return cache.key_cache[index], cache.value_cache[index]


@pytest.mark.parametrize("model_type", DECODERS)
def test_the_returned_cache_holds_stock_keys_and_values_at_real_positions(model_type, tmp_path):
    stock, converted = _load(tmp_path, model_type)
    _, ids, mask = _masks()[0]
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).past_key_values
        got = converted(input_ids=ids, attention_mask=mask).past_key_values
    assert got.get_seq_length() == want.get_seq_length() == ids.shape[1]
    real = mask.bool()
    for index in range(len(converted.layers)):
        for stock_states, states in zip(_layer_states(want, index), _layer_states(got, index)):
            assert states.shape == stock_states.shape
            on_real = (stock_states - states).transpose(1, 2)[real]  # (real tokens, heads, head size)
            assert on_real.abs().max().item() <= ATOL
            assert states.transpose(1, 2)[~real].abs().max().item() == 0  # zeros at padding


@pytest.mark.parametrize("model_type,overrides", WINDOWED, ids=lambda value: str(value))
def test_sliding_windows_and_bidirectional_gemma3_equal_stock(model_type, overrides, tmp_path):
    stock, converted = _load(tmp_path, model_type, **overrides)
    for name, ids, mask in _masks():
        before = _calls(converted)
        with torch.inference_mode():
            want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
            got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (want - got)[mask.bool()].abs().max().item() <= ATOL, name
        _assert_fused(converted, before)


@pytest.mark.parametrize("model_type", DECODERS)
def test_causal_lm_logits_and_generate_equal_stock(model_type, tmp_path):
    stock, converted = _load(tmp_path, model_type, "AutoModelForCausalLM")
    _, ids, mask = _masks()[0]  # left padding, as generation pads
    with torch.inference_mode():
        for keep in ({}, {"logits_to_keep": 1}):
            before = _calls(converted)
            want = stock(input_ids=ids, attention_mask=mask, **keep).logits
            got = converted(input_ids=ids, attention_mask=mask, **keep).logits
            real = mask.bool() if not keep else torch.ones(ids.shape[0], 1, dtype=torch.bool)
            assert (want - got)[real].abs().max().item() <= ATOL, keep
            _assert_fused(converted, before)
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        before = _calls(converted)
        want = stock.generate(input_ids=ids, attention_mask=mask, **settings)
        got = converted.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(want, got)
    report = bt_plugin.explain(converted)
    for layer, (fused, fallback) in zip(report.layers, before):
        assert layer.fused_calls == fused + 1, report  # the prefill, padding-free
        assert layer.fallback_calls == fallback + 3  # each decoding step continues a filled cache: stock
        assert "already held" in next(iter(layer.fallback_reasons))


@pytest.mark.parametrize("model_type", [t for t in DECODERS if "AutoModelForSequenceClassification" in
                                        families.model_classes(families.example_config(t))])
def test_sequence_classification_reads_the_last_token_as_stock(model_type, tmp_path):
    stock, converted = _load(tmp_path, model_type, "AutoModelForSequenceClassification")
    for name, ids, mask in _masks():
        ids = ids.masked_fill(~mask.bool(), stock.config.pad_token_id)  # a tokenizer pads with the pad id
        with torch.inference_mode():
            want = stock(input_ids=ids, attention_mask=mask).logits
            got = converted(input_ids=ids, attention_mask=mask).logits
        assert (want - got).abs().max().item() <= ATOL, name
    assert "last position" in bt_plugin.explain(converted).padded_positions
