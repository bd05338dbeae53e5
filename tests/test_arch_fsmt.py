"""FSMT: fairseq's legacy encoder layer ((T, B, C) layout, padding-marking mask, tuple return)."""

import pytest
import torch
from transformers import FSMTConfig, FSMTForConditionalGeneration, FSMTModel

import bt_plugin

VOCAB = 300


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    config = FSMTConfig(
        src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=256, encoder_layers=3, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512,
        max_position_embeddings=64, langs=["en", "de"], pad_token_id=1, eos_token_id=2, bos_token_id=0,
        decoder_start_token_id=2,
    )
    path = tmp_path_factory.mktemp("fsmt")
    FSMTForConditionalGeneration(config).save_pretrained(str(path))
    return str(path)


def _batch(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
        ids[row, real:] = 1
    return ids, mask


@pytest.mark.parametrize("kernel", ["packed", "fastpath"])
@pytest.mark.parametrize("lengths", [[7, 3, 1, 12], [9]], ids=["padded", "batch1"])
def test_fsmt_encoder_is_fused_and_exact(saved, kernel, lengths):
    stock = FSMTModel.from_pretrained(saved).eval()
    fused = bt_plugin.convert(FSMTModel.from_pretrained(saved).eval(), kernel=kernel)
    ids, mask = _batch(lengths)
    with torch.inference_mode():
        want = stock.encoder(ids, attention_mask=mask, return_dict=True).last_hidden_state
        got = fused.encoder(ids, attention_mask=mask, return_dict=True).last_hidden_state
    real = mask.bool()
    assert (want - got)[real].abs().max().item() <= 1e-5
    report = bt_plugin.explain(fused)
    assert len(report.layers) == 3  # encoder layers only; the decoder stays stock
    assert all(layer.fused_calls == 1 and layer.fallback_calls == 0 for layer in report.layers), str(report)


def test_fsmt_generate_and_hidden_states_match_stock(saved):
    stock = FSMTForConditionalGeneration.from_pretrained(saved).eval()
    fused = bt_plugin.convert(FSMTForConditionalGeneration.from_pretrained(saved).eval())
    ids, mask = _batch([6, 10, 4], seed=1)
    with torch.inference_mode():
        want = stock.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        got = fused.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        hs_want = stock.model.encoder(ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        hs_got = fused.model.encoder(ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
    assert torch.equal(want, got)
    real = mask.bool()
    assert len(hs_want.hidden_states) == len(hs_got.hidden_states)
    for w, g in zip(hs_want.hidden_states, hs_got.hidden_states):
        assert w.shape == g.shape and (w - g)[real].abs().max().item() <= 1e-5
    assert all(layer.fallback_calls == 0 for layer in bt_plugin.explain(fused).layers)
