"""A layer whose structure no longer matches its spec stays stock with a reason; loads never crash."""

import logging

import pytest
import torch
from torch import nn

import bt_plugin
from support import model_class, padded_batch, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("bert", tmp_path_factory.mktemp("bert"))


def _rename_intermediate(layer):
    """What a transformers release that renamed `intermediate` to `mlp` would look like."""
    layer.mlp = layer.intermediate
    del layer.intermediate
    layer.feed_forward_chunk = lambda x: layer.output(layer.mlp(x), x)


def test_a_renamed_submodule_keeps_that_layer_stock_with_a_reason(model_dir):
    model = model_class("bert").from_pretrained(model_dir).eval()
    stock = model_class("bert").from_pretrained(model_dir).eval()
    _rename_intermediate(model.encoder.layer[1])
    _rename_intermediate(stock.encoder.layer[1])
    bt_plugin.convert(model)
    report = bt_plugin.explain(model)
    assert [layer.converted for layer in report.layers] == [True, False, True]
    assert "no longer matches the bert spec" in report.layers[1].reason
    ids, mask = padded_batch([4, 9], seed=3, pad_token=0)
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5
    # the converted layers still ran fused, one by one around the stock layer
    report = bt_plugin.explain(model)
    assert report.layers[0].fused_calls == 1 and report.layers[2].fused_calls == 1


def test_no_matching_layer_never_breaks_a_load(model_dir, monkeypatch, caplog):
    """Zero-code path: every layer mismatching its spec -> a warning and the stock model."""
    from bt_plugin.loading import registry

    spec = registry.all_specs()["bert"]
    broken = type(spec)(**{**spec.__dict__, "linear1": "renamed_in_a_future_release.dense"})
    monkeypatch.setitem(registry.all_specs(), "bert", broken)
    with caplog.at_level(logging.WARNING, logger="bt_plugin"), bt_plugin.enabled():
        model = model_class("bert").from_pretrained(model_dir)
    assert not bt_plugin.is_converted(model)
    assert any("left BertModel stock" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="no longer matches"):
        bt_plugin.convert(model)


def test_resize_token_embeddings_and_tie_weights_keep_parity(tmp_path):
    from transformers import BertForMaskedLM

    from support import make_config

    torch.manual_seed(0)
    BertForMaskedLM(make_config("bert")).save_pretrained(str(tmp_path))
    path = str(tmp_path)

    stock = BertForMaskedLM.from_pretrained(path).eval()
    model = bt_plugin.convert(BertForMaskedLM.from_pretrained(path).eval())
    for m in (stock, model):
        m.resize_token_embeddings(1100, mean_resizing=False)
        with torch.no_grad():
            m.get_input_embeddings().weight[1000:] = 0.5
        m.tie_weights()
    ids, mask = padded_batch([6, 2, 11], seed=4, pad_token=0)
    ids[0, 0] = 1050
    with torch.inference_mode():
        got, want = model(input_ids=ids, attention_mask=mask).logits, stock(input_ids=ids, attention_mask=mask).logits
    assert got.shape[-1] == 1100
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-4
    assert all(layer.fused_calls == 1 for layer in bt_plugin.explain(model).layers)
