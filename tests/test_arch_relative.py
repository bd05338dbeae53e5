"""Relative-position encoders (patches/relative.py): MPNet's position bias added per sequence by the
packed kernel. Against stock transformers, realistic width, saved and reloaded."""

from __future__ import annotations

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.patches import relative

import support

ATOL = 1e-5
CONFIG = dict(vocab_size=support.VOCAB, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
              num_hidden_layers=3, max_position_embeddings=130)
PAD = 1  # MPNet's padding token (position ids count from it)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(cls_name: str, kernel: str = "packed", attn_implementation: str | None = None):
        key = (cls_name, kernel, attn_implementation)
        if key not in cache:
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            cache[key] = support.stock_and_converted(getattr(transformers, cls_name), transformers.MPNetConfig(**CONFIG),
                                                     kernel, **kwargs)
        return cache[key]

    return get


def batch(lengths, side="right", seed=0):
    ids, mask = support.padded_batch(lengths, seed=seed, pad_token=PAD)
    return (ids.flip(1), mask.flip(1)) if side == "left" else (ids, mask)


def run_both(stock, converted, **inputs):
    before = [layer.fused_calls for layer in bt_plugin.explain(converted).layers]
    with torch.inference_mode():
        expected, actual = stock(**inputs), converted(**inputs)
    report = bt_plugin.explain(converted)
    for f0, layer in zip(before, report.layers):
        assert layer.fused_calls == f0 + 1 and layer.fallback_calls == 0 and layer.kernel == "packed", str(report)
    return expected, actual


def close(want, got, mask):
    diff = support.max_diff_on_real(want, got, mask if want.dim() >= 3 else None)
    assert diff <= ATOL, f"max abs diff {diff:.2e}"


def test_spec_resolves_and_its_bias_is_a_layer_argument():
    from bt_plugin.dispatch.calls import parameter_names

    (layer_class,) = relative.MPNET.resolve_layer_classes()
    assert relative.MPNET.score_bias in parameter_names(layer_class)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attn_implementation", [None, "eager"])
def test_padded_batch(side, attn_implementation, pairs):
    stock, converted = pairs("MPNetModel", attn_implementation=attn_implementation)
    ids, mask = batch([30, 5, 17, 1, 12], side)
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    close(expected.last_hidden_state, actual.last_hidden_state, mask)
    close(expected.pooler_output, actual.pooler_output, None)
    if side == "right":
        assert bool((actual.last_hidden_state[~mask.bool()] == 0).all())  # padding removed


@pytest.mark.parametrize("lengths", [[24, 24, 24], [9]])
def test_no_padding_and_batch_of_one(lengths, pairs):
    stock, converted = pairs("MPNetModel")
    ids, mask = batch(lengths)
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    close(expected.last_hidden_state, actual.last_hidden_state, None)


def test_output_hidden_states(pairs):
    stock, converted = pairs("MPNetModel")
    ids, mask = batch([25, 6, 14])
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(expected.hidden_states) == len(actual.hidden_states) == CONFIG["num_hidden_layers"] + 1
    for want, got in zip(expected.hidden_states, actual.hidden_states):
        close(want, got, mask)


@pytest.mark.parametrize("cls_name", ["MPNetForSequenceClassification", "MPNetForTokenClassification",
                                      "MPNetForQuestionAnswering"])
def test_task_heads(cls_name, pairs):
    stock, converted = pairs(cls_name)
    ids, mask = batch([30, 5, 17, 1])
    expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
    every = bt_plugin.explain(converted).padded_positions.startswith("computed as stock")
    for key, want in expected.items():
        if isinstance(want, torch.Tensor):
            close(want, actual[key], None if every else mask)


def test_fastpath_leaves_mpnet_stock_with_the_reason(pairs):
    stock, converted = pairs("MPNetModel", kernel="fastpath")
    assert not bt_plugin.is_converted(converted)
    assert "relative position bias" in bt_plugin.explain(converted, kernel="fastpath").layers[0].reason


def test_output_attentions_runs_stock(pairs):
    stock, converted = pairs("MPNetModel")
    ids, mask = batch([12, 4])
    with torch.inference_mode():
        expected = stock(input_ids=ids, attention_mask=mask, output_attentions=True)
        actual = converted(input_ids=ids, attention_mask=mask, output_attentions=True)
    for want, got in zip(expected.attentions, actual.attentions):
        assert torch.equal(want, got)
    assert all(layer.reason and "output_attentions" in layer.reason for layer in bt_plugin.explain(converted).layers)


# --------------------------------------------------------------------------------------------------
# DeBERTa-v2 / DeBERTa (binned: the layer's own disentangled attention on bins of whole sequences)

DEBERTA_V3 = dict(relative_attention=True, position_buckets=32, max_relative_positions=64,
                  pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True)  # v3's settings
BINNED_CASES = {
    "deberta-v2": ("DebertaV2Config", dict(CONFIG, **DEBERTA_V3), "DebertaV2Model",
                   ("DebertaV2ForSequenceClassification", "DebertaV2ForTokenClassification")),
    "deberta": ("DebertaConfig", dict(CONFIG, relative_attention=True, pos_att_type=["p2c", "c2p"]),
                "DebertaModel", ("DebertaForSequenceClassification",)),
    "t5": ("T5Config", dict(vocab_size=support.VOCAB, d_model=256, d_kv=64, d_ff=1024, num_layers=3,
                            num_decoder_layers=2, num_heads=4, decoder_start_token_id=0),
           "T5EncoderModel", ("T5ForConditionalGeneration",)),
    "mt5": ("MT5Config", dict(vocab_size=support.VOCAB, d_model=256, d_kv=64, d_ff=1024, num_layers=3,
                              num_decoder_layers=2, num_heads=4, decoder_start_token_id=0),
            "MT5EncoderModel", ("MT5ForConditionalGeneration",)),
    "umt5": ("UMT5Config", dict(vocab_size=support.VOCAB, d_model=256, d_kv=64, d_ff=1024, num_layers=3,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0),
             "UMT5EncoderModel", ("UMT5ForConditionalGeneration",)),
    "roformer": ("RoFormerConfig", dict(CONFIG), "RoFormerModel",
                 ("RoFormerForSequenceClassification", "RoFormerForTokenClassification")),
}


@pytest.fixture(scope="module")
def binned_pairs():
    cache = {}

    def get(model_type: str, cls_name: str):
        key = (model_type, cls_name)
        if key not in cache:
            config_class, values, _, _ = BINNED_CASES[model_type]
            cache[key] = support.stock_and_converted(getattr(transformers, cls_name),
                                                     getattr(transformers, config_class)(**values))
        return cache[key]

    return get


def binned_run(stock, converted, **inputs):
    before = {layer.path: layer.fused_calls for layer in bt_plugin.explain(converted).layers}
    with torch.inference_mode():
        expected, actual = stock(**inputs), converted(**inputs)
    report = bt_plugin.explain(converted)
    served = [layer for layer in report.layers if layer.converted]
    assert served, str(report)
    for layer in served:
        assert layer.fused_calls > before[layer.path] and layer.fallback_calls == 0, str(report)
        assert layer.kernel == "binned" and layer.reason is None, str(report)
    return expected, actual


def token_batch(model, lengths, side="right", seed=0):
    ids, mask = support.padded_batch(lengths, seed=seed, pad_token=model.config.pad_token_id or 0)
    return (ids.flip(1), mask.flip(1)) if side == "left" else (ids, mask)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", list(BINNED_CASES))
def test_binned_padded_batch(model_type, side, binned_pairs):
    stock, converted = binned_pairs(model_type, BINNED_CASES[model_type][2])
    ids, mask = token_batch(stock, [30, 5, 17, 1, 12], side)
    expected, actual = binned_run(stock, converted, input_ids=ids, attention_mask=mask)
    close(expected.last_hidden_state, actual.last_hidden_state, mask)


@pytest.mark.parametrize("model_type", list(BINNED_CASES))
def test_binned_no_padding_batch_of_one_and_hidden_states(model_type, binned_pairs):
    stock, converted = binned_pairs(model_type, BINNED_CASES[model_type][2])
    for lengths in ([20, 20, 20], [9]):
        ids, mask = token_batch(stock, lengths)
        expected, actual = binned_run(stock, converted, input_ids=ids, attention_mask=mask)
        close(expected.last_hidden_state, actual.last_hidden_state, None)
    ids, mask = token_batch(stock, [25, 6, 14])
    expected, actual = binned_run(stock, converted, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(expected.hidden_states) == len(actual.hidden_states)
    for want, got in zip(expected.hidden_states, actual.hidden_states):
        close(want, got, mask)


def test_binned_packs_sequences_into_fewer_rows(binned_pairs):
    from bt_plugin.kernels.binned import BINNED, first_fit

    assert first_fit([30, 5, 17, 1, 12], 30) == [[0], [2, 4, 3], [1]]
    stock, converted = binned_pairs("deberta-v2", "DebertaV2Model")
    ids, mask = token_batch(stock, [30, 5, 17, 1, 12])
    hidden = torch.randn(5, 30, 8)
    carrier, state = BINNED.pack(hidden, mask.bool())
    assert carrier.shape == (3, 30, 8)
    back = BINNED.unpack(carrier, state)
    assert torch.equal(back[mask.bool()], hidden[mask.bool()]) and bool((back[~mask.bool()] == 0).all())


@pytest.mark.parametrize("model_type", ["deberta-v2", "deberta"])
def test_deberta_task_heads(model_type, binned_pairs):
    for cls_name in BINNED_CASES[model_type][3]:
        stock, converted = binned_pairs(model_type, cls_name)
        ids, mask = token_batch(stock, [30, 5, 17, 1])
        expected, actual = binned_run(stock, converted, input_ids=ids, attention_mask=mask)
        close(expected.logits, actual.logits, mask)


@pytest.mark.parametrize("model_type", ["t5", "mt5", "umt5"])
def test_t5_generate_and_encoder_outputs(model_type, binned_pairs):
    stock, converted = binned_pairs(model_type, BINNED_CASES[model_type][3][0])
    report = bt_plugin.explain(converted)
    decoder = [layer for layer in report.layers if layer.path.startswith("decoder.")]
    assert decoder and all(not layer.converted and "decoder block" in layer.reason for layer in decoder)
    ids, mask = token_batch(stock, [30, 5, 17, 1, 12])
    with torch.inference_mode():
        want = stock.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        got = converted.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        actual = converted.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    close(want, got, mask)
    assert torch.equal(expected, actual)
    encoder = [layer for layer in bt_plugin.explain(converted).layers if layer.converted]
    assert all(layer.kernel == "binned" and layer.fused_calls >= 2 and layer.fallback_calls == 0 for layer in encoder)


def test_a_score_bias_of_the_wrong_shape_runs_stock_with_the_reason(pairs):
    stock, converted = pairs("MPNetModel")
    layer, stock_layer = converted.encoder.layer[0], stock.encoder.layer[0]
    hidden = torch.randn(2, 6, CONFIG["hidden_size"])
    bias = torch.randn(1, CONFIG["num_attention_heads"], 5, 5)  # for 5 tokens, not 6
    with torch.inference_mode(), pytest.raises(RuntimeError):
        stock_layer(hidden, None, position_bias=bias)  # stock cannot add it either: the call must still be stock's
    with torch.inference_mode(), pytest.raises(RuntimeError):
        layer(hidden, None, position_bias=bias)
    assert "the score bias had shape (1, 4, 5, 5)" in bt_plugin.explain(converted).layers[0].reason


def test_binned_refuses_a_mask_that_is_not_key_padding(binned_pairs):
    stock, converted = binned_pairs("deberta-v2", "DebertaV2Model")
    layer, stock_layer = converted.encoder.layer[0], stock.encoder.layer[0]
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, CONFIG["hidden_size"])
    causal = torch.ones(6, 6, dtype=torch.long).tril()[None, None].expand(2, 1, 6, 6).clone()
    causal[1, :, :, 4:] = 0  # and padding, so there is something to remove
    causal[1, :, 4:, :] = 0
    rel = converted.encoder.get_rel_embedding()
    pos = converted.encoder.get_rel_pos(hidden)
    with torch.inference_mode():
        want = stock_layer(hidden, causal, relative_pos=pos, rel_embeddings=rel)[0]
        got = converted.encoder.layer[0](hidden, causal, relative_pos=pos, rel_embeddings=rel)[0]
    assert torch.equal(want, got)
    assert "restricted real tokens further than padding" in bt_plugin.explain(converted).layers[0].reason
    assert "_bt_layercode_reason" not in layer.__dict__  # a refused mask concerns that call only
    ids, mask = token_batch(stock, [30, 5, 17])
    before = bt_plugin.explain(converted).layers[0]
    with torch.inference_mode():
        expected, actual = stock(input_ids=ids, attention_mask=mask), converted(input_ids=ids, attention_mask=mask)
    after = bt_plugin.explain(converted).layers[0]
    assert after.fused_calls == before.fused_calls + 1 and after.fallback_calls == before.fallback_calls
    assert after.kernel == "binned" and after.reason is None
    close(expected.last_hidden_state, actual.last_hidden_state, mask)


def test_roformer_with_rotary_values_stays_stock_with_the_reason():
    config = transformers.RoFormerConfig(**dict(CONFIG, rotary_value=True))
    with pytest.raises(ValueError, match="rotary_value was True"):
        bt_plugin.convert(transformers.RoFormerModel(config).eval())


def test_a_later_layer_handed_another_score_bias_computes_with_it(monkeypatch):
    """A loop that hands each layer a score bias of its own (not the one the first layer packed
    with): each later layer computes with the bias it was given, as stock does."""
    stock, converted = support.stock_and_converted(transformers.MPNetModel, transformers.MPNetConfig(**CONFIG), "packed")

    def per_layer_bias(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False,
                       output_hidden_states=False, return_dict=False, **kwargs):
        bias = self.compute_position_bias(hidden_states)
        for i, layer in enumerate(self.layer):
            if head_mask is not None:  # transformers 4.x hands the encoder one entry per layer
                kwargs["head_mask"] = head_mask[i]
            hidden_states = layer(hidden_states, attention_mask, position_bias=bias * (i + 1), **kwargs)[0]
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden_states)

    monkeypatch.setattr(transformers.models.mpnet.modeling_mpnet.MPNetEncoder, "forward", per_layer_bias)
    for lengths in ([24, 24], [30, 5, 17]):
        ids, mask = batch(lengths)
        expected, actual = run_both(stock, converted, input_ids=ids, attention_mask=mask)
        close(expected.last_hidden_state, actual.last_hidden_state, mask)
