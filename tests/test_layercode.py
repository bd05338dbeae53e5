"""The layer-code path on already-served families: unmerged LoRA adapters, dynamically quantized
linears and any replaced token-wise module run padding-free instead of falling back; a layer
whose attention does not go through transformers' attention interface is refused with a reason."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import bt_plugin

import support

ATOL = 1e-5
LENGTHS = [30, 5, 17, 1, 12]
LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return support.save_model("bert", tmp_path_factory.mktemp("bert"), head=True)


def load(path: str, converted: bool):
    cls = support.model_class("bert", head=True)
    if not converted:
        return cls.from_pretrained(path).eval()
    with bt_plugin.enabled():
        return cls.from_pretrained(path).eval()


def with_adapters(model, names=("first", "second")):
    """The same LoRA adapters (random, non-zero B) on every attention and FFN linear."""
    peft_model = None
    for index, name in enumerate(names):
        torch.manual_seed(100 + index)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return peft_model.eval()


def assert_ran_layer_code(model, note_part: str) -> None:
    for layer in bt_plugin.explain(model).layers:
        assert layer.kernel == "layercode" and layer.fallback_calls == 0 and layer.fused_calls > 0, layer
        assert note_part in layer.note


def test_unmerged_lora_runs_padding_free_and_equals_stock_with_the_adapter(bert_dir):
    stock, converted = with_adapters(load(bert_dir, False)), with_adapters(load(bert_dir, True))
    ids, mask = support.padded_batch(LENGTHS, pad_token=0)
    for name in ("first", "second", "first"):  # switching adapters stays exact
        stock.set_adapter(name)
        converted.set_adapter(name)
        with torch.inference_mode():
            want = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            got = converted(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            last_want = stock.base_model.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            last_got = converted.base_model.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (want.logits - got.logits).abs().max().item() <= ATOL
        for a, b in zip(want.hidden_states, got.hidden_states):
            assert support.max_diff_on_real(a, b, mask) <= ATOL
        assert support.max_diff_on_real(last_want, last_got, mask) <= ATOL
        assert bool((last_got[~mask.bool()] == 0).all())  # padding removed, not computed
    assert_ran_layer_code(converted.get_base_model(), "peft.tuners.lora")
    # the adapters differ: the check above is not vacuous
    stock.set_adapter("second")
    with torch.inference_mode():
        other = stock(input_ids=ids, attention_mask=mask).logits
    assert (other - want.logits).abs().max().item() > 1e-3


def test_quantize_dynamic_runs_padding_free_close_to_stock_int8(bert_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        stock = torch.ao.quantization.quantize_dynamic(load(bert_dir, False).bert, {torch.nn.Linear}, dtype=torch.qint8)
        converted = torch.ao.quantization.quantize_dynamic(load(bert_dir, True).bert, {torch.nn.Linear}, dtype=torch.qint8)
    ids, mask = support.padded_batch(LENGTHS, pad_token=0)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(want[real], got[real], dim=-1)
    assert cosine.min().item() >= 0.999
    assert bool((got[~real] == 0).all())
    assert_ran_layer_code(converted, "quantized")


def self_made_attention(module, hidden_states, attention_mask=None, **kwargs):
    """BERT self-attention written out by hand (no attention interface), as a fork might do."""
    shape = (*hidden_states.shape[:-1], -1, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (module.query, module.key, module.value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
    return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1), None


def test_a_layer_that_bypasses_the_attention_interface_is_refused(bert_dir):
    """Its packed tokens would attend across sequences: detected, re-run stock, reason kept."""
    stock, converted = load(bert_dir, False), load(bert_dir, True)
    for model in (stock, converted):
        attention = model.bert.encoder.layer[1].attention.self
        attention.query = support.Wrapped(attention.query)
        attention.forward = types.MethodType(self_made_attention, attention)
    ids, mask = support.padded_batch(LENGTHS, pad_token=0)
    for _ in range(2):
        with torch.inference_mode():
            want = stock(input_ids=ids, attention_mask=mask).logits
            got = converted(input_ids=ids, attention_mask=mask).logits
        assert (want - got).abs().max().item() <= ATOL
    report = bt_plugin.explain(converted).layers[1]
    assert report.fallback_calls == 2 and "did not call transformers' attention interface" in report.reason


def test_layer_code_can_be_chosen_for_a_plain_layer(bert_dir):
    """`kernel="layercode"` runs the stock code of every layer padding-free (for comparisons)."""
    stock = load(bert_dir, False)
    with bt_plugin.enabled(kernel="layercode"):
        converted = support.model_class("bert", head=True).from_pretrained(bert_dir).eval()
    ids, mask = support.padded_batch(LENGTHS, pad_token=0)
    with torch.inference_mode():
        want, got = stock(input_ids=ids, attention_mask=mask).logits, converted(input_ids=ids, attention_mask=mask).logits
    assert (want - got).abs().max().item() <= ATOL
    assert all(layer.kernel == "layercode" and layer.note is None for layer in bt_plugin.explain(converted).layers)
    assert copy.deepcopy(converted) is not None



def test_a_call_with_nothing_padded_checks_its_mask_once_per_stack(bert_dir, monkeypatch):
    """The encoder handed a mask that masks nothing (an additive (B, 1, L, L) mask of zeros, as
    transformers 4.x builds for rows of one length): every adapter layer runs its own code on the
    batch, equal to stock; the first layer checks the mask, the later ones reuse its answer (the
    stack's frame). A mask that masks something is checked and packed."""
    from bt_plugin.kernels.layercode import LAYER_CODE

    stock = with_adapters(load(bert_dir, False), names=("first",))
    converted = with_adapters(load(bert_dir, True), names=("first",))
    checks = []
    keep_mask = LAYER_CODE.keep_mask
    monkeypatch.setattr(type(LAYER_CODE), "keep_mask", staticmethod(lambda *a: checks.append(1) or keep_mask(*a)))
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, stock.get_base_model().config.hidden_size)
    unpadded = torch.zeros(3, 1, 9, 9)
    padded = unpadded.clone()
    padded[1, :, :, 4:] = torch.finfo(torch.float32).min  # row 1: five padded keys
    for mask, expected_checks in ((unpadded, 1), (padded, None)):
        checks.clear()
        with torch.inference_mode():
            want = stock.base_model.model.bert.encoder(hidden, attention_mask=mask).last_hidden_state
            got = converted.base_model.model.bert.encoder(hidden, attention_mask=mask).last_hidden_state
        real = torch.ones(3, 9, dtype=torch.long)
        if expected_checks is None:
            real[1, 4:] = 0
        assert support.max_diff_on_real(want, got, real) <= ATOL
        if expected_checks is not None:
            assert len(checks) == expected_checks
    layers = bt_plugin.explain(converted.get_base_model()).layers
    assert len(layers) > 1  # more than one layer: the reuse is exercised
    assert_ran_layer_code(converted.get_base_model(), "peft.tuners.lora")
    assert all(layer.fused_calls == 2 for layer in layers)


def test_an_unpadded_call_follows_a_merged_adapter_to_the_fused_kernel(bert_dir):
    """Which layers run their own code is remembered between calls (bt_plugin.dispatch.structure_epoch):
    merging the adapter puts plain linears back (module assignments), and the next unpadded call of
    the same layers runs the fused kernel, equal to stock with the adapter merged."""
    stock = with_adapters(load(bert_dir, False), names=("first",))
    converted = with_adapters(load(bert_dir, True), names=("first",))
    ids, mask = support.padded_batch([11, 11], pad_token=0)  # nothing padded
    with torch.inference_mode():
        converted(input_ids=ids, attention_mask=mask)
    assert_ran_layer_code(converted.get_base_model(), "peft.tuners.lora")
    stock, converted = stock.merge_and_unload(), converted.merge_and_unload()
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        got = converted(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        last_want = stock.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        last_got = converted.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert support.max_diff_on_real(want, got, mask) <= ATOL
    assert support.max_diff_on_real(last_want, last_got, mask) <= ATOL
    for layer in bt_plugin.explain(converted).layers:
        assert layer.kernel == "packed" and layer.note is None and layer.fallback_calls == 0, layer


def _run_and_compare(stock, converted, ids, mask):
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        got = converted(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert support.max_diff_on_real(want, got, mask) <= ATOL


def test_later_layers_of_an_unpadded_call_take_the_first_layers_verdict(bert_dir, monkeypatch):
    """On an unpadded call the stack's first layer decides once for the later layers that would
    decide the same (layer code serving them, computing as loaded, eval mode): one check per stack
    call, not one per layer, with every layer's counters still counted, equal to stock."""
    from bt_plugin.dispatch import layer as layer_module

    stock = with_adapters(load(bert_dir, False), names=("first",))
    converted = with_adapters(load(bert_dir, True), names=("first",))
    checks = []
    checked = layer_module._own_code_serves_unpadded
    monkeypatch.setattr(layer_module, "_own_code_serves_unpadded", lambda *a: checks.append(a[0]) or checked(*a))
    ids, mask = support.padded_batch([11, 11], pad_token=0)  # nothing padded
    for _ in range(2):
        _run_and_compare(stock, converted, ids, mask)
    layers = bt_plugin.explain(converted.get_base_model()).layers
    assert len(layers) > 1
    first = converted.get_base_model().bert.encoder.layer[0]
    assert checks == [first, first]
    assert_ran_layer_code(converted.get_base_model(), "peft.tuners.lora")
    assert all(layer.fused_calls == 2 and layer.precision == "fp32" for layer in layers), layers
    padded_ids, padded_mask = support.padded_batch([11, 4], pad_token=0)  # padded: the stack is packed
    _run_and_compare(stock, converted, padded_ids, padded_mask)
    assert all(layer.fused_calls == 3 for layer in bt_plugin.explain(converted.get_base_model()).layers)


def test_a_later_layer_with_a_fused_kernel_is_not_passed_on(bert_dir):
    """An adapter on the first layer only: that layer runs its stock code as called, the later
    layers (plain linears) their fused kernel, each as its own call; equal to stock."""
    stock, converted = load(bert_dir, False), load(bert_dir, True)
    models = []
    for model in (stock, converted):
        torch.manual_seed(100)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False,
                            layers_to_transform=[0], layers_pattern="layer")
        models.append(get_peft_model(model, config).eval())
    stock, converted = models
    ids, mask = support.padded_batch([11, 11], pad_token=0)
    _run_and_compare(stock, converted, ids, mask)
    first, *later = bt_plugin.explain(converted.get_base_model()).layers
    assert first.kernel == "layercode" and "peft.tuners.lora" in first.note and first.fused_calls == 1
    assert later and all(layer.kernel == "packed" and layer.note is None and layer.fused_calls == 1 for layer in later)


def test_slicing_the_layer_list_keeps_the_remembered_verdict(bert_dir, monkeypatch):
    """Decoder-style models slice their layer list on every call (`self.layers[:n]` builds a new
    ModuleList: one module assignment per layer). That moves converted layers and changes what no
    layer holds, so which layers run their own code stays remembered (else it is found again on
    every call); assigning a module inside a layer still voids it."""
    from bt_plugin.dispatch import eligibility

    converted = with_adapters(load(bert_dir, True), names=("first",))
    base = converted.get_base_model()
    ids, mask = support.padded_batch([11, 11], pad_token=0)
    with torch.inference_mode():
        converted(input_ids=ids, attention_mask=mask)
    found = []
    serves = eligibility.layer_code_serves
    monkeypatch.setattr(eligibility, "layer_code_serves", lambda *a: found.append(a[0]) or serves(*a))
    assert len(base.bert.encoder.layer[:2]) == 2
    with torch.inference_mode():
        converted(input_ids=ids, attention_mask=mask)
    assert found == []
    base.bert.encoder.layer[0].attention.self.dropout = torch.nn.Dropout(0.0)
    with torch.inference_mode():
        converted(input_ids=ids, attention_mask=mask)
    assert len(found) == len(base.bert.encoder.layer)
