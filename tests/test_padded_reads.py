"""Heads that read padded positions see stock values there; models that don't keep their speed.

The fused paths write zeros at padded positions. For a model whose head reads them without the
mask (CTC, frame classification, x-vectors, question answering, a first-token classifier or a
pooler on a left-padded row), `packed` computes the padded rows as stock does: every output,
padded positions included, must equal stock. Base models still drop the padding (zeros there).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.loading import registry

import support

ATOL = 1e-5
AUDIO_SIZES = dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=2,
                   conv_dim=(64, 64, 64), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3))
STABLE = dict(do_stable_layer_norm=True, feat_extract_norm="layer")

# (model class, config overrides): every audio head of the served families that reads every frame
AUDIO_EVERY_FRAME = [
    *[(f"{arch}ForCTC", {}) for arch in ("Wav2Vec2", "Hubert", "Data2VecAudio", "SEW", "UniSpeech", "UniSpeechSat")],
    *[(f"{arch}ForCTC", STABLE) for arch in ("Wav2Vec2", "Hubert", "UniSpeech", "UniSpeechSat")],
    *[(f"{arch}ForAudioFrameClassification", {}) for arch in ("Wav2Vec2", "Data2VecAudio", "UniSpeechSat")],
    ("Wav2Vec2ForAudioFrameClassification", dict(use_weighted_layer_sum=True)),
    *[(f"{arch}ForXVector", {}) for arch in ("Wav2Vec2", "Data2VecAudio", "UniSpeechSat")],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_pair(cls, config, kernel: str = "packed", seed: int = 0):
    """(stock, converted) of `cls(config)`, saved and loaded back through from_pretrained."""
    stock, converted = support.stock_and_converted(cls, config, kernel, seed)
    assert bt_plugin.is_converted(converted) and not bt_plugin.is_converted(stock)
    return stock, converted


def audio_pair(name: str, overrides: dict, kernel: str = "packed"):
    cls = getattr(transformers, name)
    return load_pair(cls, cls.config_class(**{**AUDIO_SIZES, **overrides}), kernel)


def waveforms(lengths: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, real in enumerate(lengths):
        values[row, :real] = torch.randn(real, generator=generator)
        mask[row, :real] = 1
    return values, mask


def run(model, **inputs):
    with torch.inference_mode():
        return model(**inputs)


def assert_all_equal(expected, actual) -> None:
    """Every tensor output equal at every position (padded ones included)."""
    keys = [key for key, value in expected.items() if isinstance(value, torch.Tensor)]
    assert keys
    for key in keys:
        diff = (expected[key] - actual[key]).abs().max().item()
        assert diff <= ATOL, f"{key}: max abs diff {diff:.2e} over every position"


def assert_every_call_fused(model, calls: int = 1) -> None:
    report = bt_plugin.explain(model)
    assert report.layers
    for layer in report.layers:
        assert layer.fused_calls == calls and layer.fallback_calls == 0, str(report)


@pytest.mark.parametrize("name, overrides", AUDIO_EVERY_FRAME,
                         ids=[f"{n}{'-stable' if o.get('do_stable_layer_norm') else ''}{'-weighted' if o.get('use_weighted_layer_sum') else ''}"
                              for n, o in AUDIO_EVERY_FRAME])
def test_audio_heads_reading_every_frame_equal_stock_everywhere(name, overrides):
    model_type = getattr(transformers, name).config_class.model_type
    if not registry.specs_for_model_type(model_type):  # SEW before 5.13 (tests/test_arch_audio.py)
        pytest.skip(registry.absent_reason_for_model_type(model_type))
    stock, converted = audio_pair(name, overrides)
    values, mask = waveforms([1600, 700, 1100, 400])
    expected, actual = run(stock, input_values=values, attention_mask=mask), run(converted, input_values=values, attention_mask=mask)
    assert_all_equal(expected, actual)
    assert_every_call_fused(converted)
    assert bt_plugin.explain(converted).padded_positions.startswith("computed as stock")
    if expected.logits.dim() == 3 and "CTC" in name:  # a batched transcription decodes every frame
        assert torch.equal(expected.logits.argmax(-1), actual.logits.argmax(-1))


def test_ctc_on_fastpath_falls_back_with_the_reason():
    stock, converted = audio_pair("Wav2Vec2ForCTC", {}, kernel="fastpath")
    values, mask = waveforms([1600, 700])
    assert torch.equal(run(stock, input_values=values, attention_mask=mask).logits,
                       run(converted, input_values=values, attention_mask=mask).logits)
    for layer in bt_plugin.explain(converted).layers:
        assert layer.fallback_calls == 1 and "Wav2Vec2ForCTC's head reads every position" in layer.reason
        assert "packed computes them" in layer.reason


@pytest.mark.parametrize("name", ["Wav2Vec2Model", "Wav2Vec2ForSequenceClassification"])
def test_audio_models_that_pool_with_the_mask_still_drop_padding(name):
    stock, converted = audio_pair(name, {})
    values, mask = waveforms([1600, 700, 400])
    expected, actual = run(stock, input_values=values, attention_mask=mask), run(converted, input_values=values, attention_mask=mask)
    assert_every_call_fused(converted)
    assert bt_plugin.explain(converted).padded_positions.startswith("zeros")
    if name == "Wav2Vec2Model":
        frames = stock._get_feature_vector_attention_mask(expected.last_hidden_state.shape[1], mask).bool()
        assert not bool(frames.all())
        assert support.max_diff_on_real(expected.last_hidden_state, actual.last_hidden_state, frames) <= ATOL
        assert bool((actual.last_hidden_state[~frames] == 0).all())  # padding was removed, not computed
    else:
        assert_all_equal(expected, actual)


# --------------------------------------------------------------------------------------------------
# text


def text_pair(cls_name: str, model_type: str = "bert", **overrides):
    cls = getattr(transformers, cls_name)
    return load_pair(cls, support.make_config(model_type, **overrides))


def left_padded(lengths: list[int], seed: int = 0):
    ids, mask = support.padded_batch(lengths, seed=seed)
    return ids.flip(1), mask.flip(1)


@pytest.mark.parametrize("cls_name, model_type", [
    ("BertForQuestionAnswering", "bert"), ("RobertaForQuestionAnswering", "roberta"),
    ("ElectraForQuestionAnswering", "electra"),
])
@pytest.mark.parametrize("side", ["right", "left"])
def test_question_answering_logits_equal_stock_at_every_position(cls_name, model_type, side):
    stock, converted = text_pair(cls_name, model_type)
    ids, mask = (support.padded_batch if side == "right" else left_padded)([12, 5, 30, 1])
    expected, actual = run(stock, input_ids=ids, attention_mask=mask), run(converted, input_ids=ids, attention_mask=mask)
    assert_all_equal(expected, actual)
    assert torch.equal(expected.start_logits.argmax(-1), actual.start_logits.argmax(-1))
    assert_every_call_fused(converted)


@pytest.mark.parametrize("cls_name, model_type", [
    ("BertForSequenceClassification", "bert"), ("RobertaForSequenceClassification", "roberta"),
    ("BertModel", "bert"), ("ElectraForSequenceClassification", "electra"),
])
def test_first_token_readers_equal_stock_on_left_padding(cls_name, model_type):
    stock, converted = text_pair(cls_name, model_type)
    ids, mask = left_padded([12, 5, 30, 1])
    expected, actual = run(stock, input_ids=ids, attention_mask=mask), run(converted, input_ids=ids, attention_mask=mask)
    if cls_name == "BertModel":
        assert (expected.pooler_output - actual.pooler_output).abs().max().item() <= ATOL
        assert support.max_diff_on_real(expected.last_hidden_state, actual.last_hidden_state, mask) <= ATOL
    else:
        assert_all_equal(expected, actual)
    assert_every_call_fused(converted)
    assert "first position" in bt_plugin.explain(converted).padded_positions


@pytest.mark.parametrize("cls_name", ["BertForSequenceClassification", "BertModel"])
def test_first_token_readers_still_drop_right_padding(cls_name):
    stock, converted = text_pair(cls_name)
    ids, mask = support.padded_batch([12, 5, 30, 1])
    expected, actual = run(stock, input_ids=ids, attention_mask=mask), run(converted, input_ids=ids, attention_mask=mask)
    if cls_name == "BertModel":
        assert (expected.pooler_output - actual.pooler_output).abs().max().item() <= ATOL
        assert bool((actual.last_hidden_state[~mask.bool()] == 0).all())  # padding removed
    else:
        assert_all_equal(expected, actual)
    assert_every_call_fused(converted)


@pytest.mark.parametrize("cls_name", ["BertForTokenClassification", "BertForMaskedLM"])
def test_per_token_heads_get_zeros_at_padding_and_stock_on_real_tokens(cls_name):
    """Their padded positions are discarded by pipelines, losses (label -100) and metrics."""
    stock, converted = text_pair(cls_name)
    ids, mask = support.padded_batch([12, 5, 30, 1])
    expected, actual = run(stock, input_ids=ids, attention_mask=mask), run(converted, input_ids=ids, attention_mask=mask)
    assert support.max_diff_on_real(expected.logits, actual.logits, mask) <= ATOL
    assert_every_call_fused(converted)
    assert bt_plugin.explain(converted).padded_positions.startswith("zeros")
