"""Every family whose layers call transformers' attention interface runs padding-free when a
projection was replaced (an adapter): one model per spec, each layer's query projection wrapped,
against the stock model wrapped the same way."""

from __future__ import annotations

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.loading import registry
from bt_plugin.spec import resolve_path

import support

ATOL = 1e-5
TEXT = dict(vocab_size=support.VOCAB, hidden_size=64, num_attention_heads=2, intermediate_size=128,
            num_hidden_layers=2, max_position_embeddings=64)
AUDIO = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
             conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16)
SEQ2SEQ = dict(vocab_size=support.VOCAB, d_model=64, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=1,
               max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
               decoder_start_token_id=2)


def text_inputs(model):
    ids, mask = support.padded_batch([20, 5, 13, 1], pad_token=model.config.pad_token_id or 0)
    return dict(input_ids=ids, attention_mask=mask), mask


def audio_inputs(model):
    values, samples = torch.zeros(3, 1600), torch.zeros(3, 1600, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for row, length in enumerate([1600, 700, 1100]):
        values[row, :length], samples[row, :length] = torch.randn(length, generator=generator), 1
    return dict(input_values=values, attention_mask=samples), None


def fbank_inputs(model):
    features, mask = torch.randn(3, 40, 80, generator=torch.Generator().manual_seed(0)), torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:], mask[2, 9:] = 0, 0
    return dict(input_features=features, attention_mask=mask, decoder_input_ids=torch.full((3, 1), 2)), None


def encoder_inputs(model):
    inputs, mask = text_inputs(model)
    return inputs, mask


# spec name -> (config class, model class, config values, inputs, output read)
CASES = {
    "bert_layout": ("BertGenerationConfig", "BertGenerationEncoder", TEXT, text_inputs, "last_hidden_state"),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   dict(vocab_size=support.VOCAB, dim=64, n_heads=2, hidden_dim=128, n_layers=2), text_inputs,
                   "last_hidden_state"),
    "albert": ("AlbertConfig", "AlbertModel", dict(TEXT, embedding_size=32), text_inputs, "last_hidden_state"),
    "xlm_roberta_xl": ("XLMRobertaXLConfig", "XLMRobertaXLModel", TEXT, text_inputs, "last_hidden_state"),
    "roberta_prelayernorm": ("RobertaPreLayerNormConfig", "RobertaPreLayerNormModel", TEXT, text_inputs,
                             "last_hidden_state"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", AUDIO, audio_inputs, "last_hidden_state"),
    "sew": ("SEWConfig", "SEWModel", AUDIO, audio_inputs, "last_hidden_state"),
    "wav2vec2-stable-layer-norm": ("Wav2Vec2Config", "Wav2Vec2Model",
                                   dict(AUDIO, do_stable_layer_norm=True, feat_extract_norm="layer"),
                                   audio_inputs, "last_hidden_state"),
    "speech_to_text": ("Speech2TextConfig", "Speech2TextModel",
                       dict(SEQ2SEQ, conv_channels=64, input_feat_per_channel=80, max_source_positions=64),
                       fbank_inputs, "encoder_last_hidden_state"),
    "bart": ("BartConfig", "BartModel", SEQ2SEQ, encoder_inputs, "encoder_last_hidden_state"),
    "mbart": ("MBartConfig", "MBartModel", SEQ2SEQ, encoder_inputs, "encoder_last_hidden_state"),
}


def wrap_queries(model, spec) -> None:
    for layer in model.modules():
        if isinstance(layer, spec.resolve_layer_classes()):
            owner_path, _, name = spec.query.rpartition(".")
            owner = resolve_path(layer, owner_path) if owner_path else layer
            setattr(owner, name, support.Wrapped(getattr(owner, name)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_cases_cover_every_padded_family_with_the_attention_interface():
    padded = {name for name, spec in registry.all_specs().items()
              if spec.attention_interface and spec.has_fused_layout and name not in ("bert",)}
    vision_or_unpadded = {name for name in padded if registry.all_specs()[name].model_types[0] in (
        "vit", "deit", "vit_mae", "vit_msn", "ijepa", "pixio", "vivit", "yolos", "videomae", "dpt", "dinov2",
        "dinov2_with_registers", "clip", "metaclip_2", "owlvit", "owlv2", "siglip", "siglip2", "chinese_clip",
        "altclip", "clipseg_vision_model", "git_vision_model", "whisper")}
    assert padded - vision_or_unpadded == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_replaced_projection_runs_padding_free(name):
    config_class, model_class, values, make_inputs, read = CASES[name]
    cls = getattr(transformers, model_class)
    stock, converted = support.stock_and_converted(cls, getattr(transformers, config_class)(**values))
    spec = registry.all_specs()[name]
    assert bt_plugin.explain(converted).family == name
    wrap_queries(stock, spec)
    wrap_queries(converted, spec)
    inputs, mask = make_inputs(stock)
    with torch.inference_mode():
        want, got = stock(**inputs)[read], converted(**inputs)[read]
    if mask is None and "input_values" in inputs:
        mask = stock._get_feature_vector_attention_mask(want.shape[1], inputs["attention_mask"])
    elif mask is None:
        mask = stock.encoder._get_feature_vector_attention_mask(want.shape[1], inputs["attention_mask"])
    assert not bool(mask.all())
    assert support.max_diff_on_real(want, got, mask) <= ATOL
    report = bt_plugin.explain(converted)
    for layer in report.layers:
        assert layer.kernel == "layercode" and layer.fused_calls >= 1 and layer.fallback_calls == 0, str(report)
        assert "Wrapped" in layer.note
