"""Integration with torch.compile and with peft LoRA adapters.

torch.compile: the compiled converted model equals stock; while dynamo traces, every layer takes
the stock forward (reason "torch.compile was tracing the model"), and dynamo graph-breaks on the
ContextVar that marks the encoder's layer loop (`StackOwner.forward`) without erroring.

peft LoRA on a converted model: training runs the stock path (same loss and LoRA gradients as the
same adapter on a stock model); in eval an unmerged adapter makes every layer fall back with a
reason naming `attention.self.query`; after `merge_and_unload()` the layers run fused again.

Tiny models (hidden 64, 2 layers), one thread, one compiled shape: the file stays well under a
minute on two cores, most of it inductor's compile.
"""

from __future__ import annotations

import pytest
import torch

import bt_plugin
from support import max_diff_on_real, model_class, padded_batch, save_model

import peft  # the test extra: a missing peft must fail, not skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
LENGTHS = [7, 3, 5]  # right-padded to 8
TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _pair(tmp_path, head: bool = False, **overrides):
    """(stock, converted) copies of the same tiny bert checkpoint, both in eval mode."""
    directory = save_model("bert", tmp_path / "model", head=head, **TINY, **overrides)
    cls = model_class("bert", head)
    stock = cls.from_pretrained(directory).eval()
    converted = bt_plugin.convert(cls.from_pretrained(directory).eval())
    assert bt_plugin.is_converted(converted) and not bt_plugin.is_converted(stock)
    return stock, converted


def _counts(model):
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_matches_stock_and_falls_back_while_tracing(tmp_path):
    import torch._dynamo as dynamo

    stock, converted = _pair(tmp_path)
    ids, mask = padded_batch(LENGTHS, length=8)
    with torch.inference_mode():
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        eager = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_real(expected, eager, mask) <= ATOL
    assert _counts(converted) == [(1, 0), (1, 0)]  # the uncompiled model runs fused

    dynamo.reset()
    try:
        compiled = torch.compile(converted)  # default backend: inductor
        with torch.inference_mode():
            first = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            second = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        assert max_diff_on_real(expected, first, mask) <= ATOL
        assert max_diff_on_real(expected, second, mask) <= ATOL

        # While tracing, every layer took the stock forward, and explain says so; the compiled
        # graph is the stock computation (fused_calls stays at the one eager call).
        report = bt_plugin.explain(converted)
        for layer in report.layers:
            assert layer.converted and layer.status == "fallback"
            assert layer.fused_calls == 1 and layer.fallback_calls >= 1
            assert layer.reason == "torch.compile was tracing the model"
            assert set(layer.fallback_reasons) == {"torch.compile was tracing the model"}

        # The original module is untouched by compiling: called directly it runs fused again.
        before = _counts(converted)
        with torch.inference_mode():
            again = converted(input_ids=ids, attention_mask=mask).last_hidden_state
        assert max_diff_on_real(expected, again, mask) <= ATOL
        assert [c[0] for c in _counts(converted)] == [b[0] + 1 for b in before]
        assert bt_plugin.explain(converted).layers[0].reason is None
    finally:
        dynamo.reset()


# ---------------------------------------------------------------------------------------------
# peft LoRA


def _lora(model, seed: int = 0):
    """LoRA on query/value with random (non-zero) A and B, so every LoRA weight gets a gradient."""
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["query", "value"], init_lora_weights=False,
    )
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


def _lora_pair(tmp_path):
    stock, converted = _pair(tmp_path, head=True, num_labels=3, **NO_DROPOUT)
    stock_peft = _lora(stock)
    converted_peft = _lora(converted)
    # Same adapter (and classifier copy) in both: copy every trainable tensor over.
    trainable = {n: p for n, p in stock_peft.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in converted_peft.named_parameters():
            if param.requires_grad:
                param.copy_(trainable.pop(name))
    assert not trainable
    base = converted_peft.get_base_model()
    assert type(base).__name__ == "BertForSequenceClassification" and bt_plugin.is_converted(base)
    return stock_peft, converted_peft


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_peft_lora_training_runs_the_stock_path(tmp_path):
    stock_peft, converted_peft = _lora_pair(tmp_path)
    ids, mask = padded_batch(LENGTHS, length=8)
    labels = torch.tensor([0, 2, 1])
    losses, grads = [], []
    for model in (stock_peft, converted_peft):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(_lora_grads(model))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    assert set(grads[1]) == set(grads[0]) and len(grads[0]) == 2 * 2 * 2  # 2 layers x q,v x A,B
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)

    for layer in bt_plugin.explain(converted_peft.get_base_model()).layers:
        assert layer.converted and layer.fused_calls == 0 and layer.fallback_calls == 1
        assert layer.reason == "the layer was in training mode (model.train())"


def test_peft_lora_unmerged_runs_layer_code_and_merged_runs_fused(tmp_path):
    stock_peft, converted_peft = _lora_pair(tmp_path)
    stock_peft.eval(), converted_peft.eval()
    ids, mask = padded_batch(LENGTHS, length=8)

    # (b) unmerged adapter: the query projection is a peft module, which no fused kernel computes:
    # every layer runs its own code (the adapter included) on the packed real tokens.
    with torch.inference_mode():
        expected = stock_peft(input_ids=ids, attention_mask=mask).logits
        got = converted_peft(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    base = converted_peft.get_base_model()
    for layer in bt_plugin.explain(base).layers:
        assert layer.converted and layer.status == "fused" and layer.kernel == "layercode"
        assert layer.fused_calls == 1 and layer.fallback_calls == 0
        assert layer.note.startswith("attention.self.query was peft."), layer.note
        assert "not torch.nn.Linear" in layer.note

    # (c) merged: the adapter is folded into plain nn.Linear weights; fused again, same numbers.
    stock_merged = stock_peft.merge_and_unload()
    converted_merged = converted_peft.merge_and_unload()
    assert converted_merged is base and bt_plugin.is_converted(converted_merged)
    assert type(base.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.inference_mode():
        expected_merged = stock_merged(input_ids=ids, attention_mask=mask).logits
        got_merged = converted_merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got_merged, expected_merged, atol=ATOL, rtol=0)
    torch.testing.assert_close(expected_merged, expected, atol=1e-4, rtol=0)  # merging kept the adapter
    for layer in bt_plugin.explain(converted_merged).layers:
        assert layer.converted and layer.status == "fused" and layer.reason is None
        assert layer.kernel == "packed" and layer.note is None
        assert layer.fused_calls == 2 and layer.fallback_calls == 0

    # Token features too (fused outputs are zeros at padding: compare real tokens only).
    with torch.inference_mode():
        stock_hidden = stock_merged.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        fused_hidden = converted_merged.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_real(stock_hidden, fused_hidden, mask) <= ATOL
