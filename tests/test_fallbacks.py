"""Calls the fused path cannot serve: each must give stock's result, record a telling reason in
`explain()`, and the next call without the condition must run fused again.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

import bt_plugin
from bt_plugin.dispatch.eligibility import layer_code_reason
from support import hidden_of, max_diff_on_real, model_class, padded_batch, records_with_hooks, save_model

LENGTHS = [9, 16, 4, 13]
TOL = 1e-5
LAYERS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("bert", tmp_path_factory.mktemp("bert"), seed=0, num_hidden_layers=LAYERS)


def load(directory, **kwargs):
    return model_class("bert").from_pretrained(directory, **kwargs).eval()


def pair(directory, kernel="auto", **kwargs):
    """(stock, converted) loaded from the same directory."""
    stock = load(directory, **kwargs)
    converted = bt_plugin.convert(load(directory, **kwargs), kernel=kernel)
    return stock, converted


def counts(model) -> list[tuple[int, int]]:
    return [(r.fused_calls, r.fallback_calls) for r in bt_plugin.explain(model).layers]


def totals(model) -> tuple[int, int]:
    c = counts(model)
    return sum(f for f, _ in c), sum(b for _, b in c)


def reports(model):
    return bt_plugin.explain(model).layers


def assert_fell_back(model, before, word, layers=None):
    """Fallbacks happened since `before` (on `layers`, default all) and each says `word`."""
    after = counts(model)
    indices = range(len(after)) if layers is None else layers
    for index in indices:
        report = reports(model)[index]
        assert after[index][1] > before[index][1], bt_plugin.explain(model)
        assert report.reason is not None and word in report.reason, report
        assert any(word in r for r in report.fallback_reasons), report
    return after


def assert_fused_again(model, stock, lengths=LENGTHS, seed=5, **kwargs):
    """A plain inference call now runs fused on every layer and matches stock on real tokens."""
    ids, mask = padded_batch(lengths, seed=seed)
    before = counts(model)
    with torch.inference_mode():
        got = model(ids, attention_mask=mask, **kwargs).last_hidden_state
        want = stock(ids, attention_mask=mask, **kwargs).last_hidden_state
    after = counts(model)
    assert not got.is_nested and got.shape == want.shape
    assert max_diff_on_real(got, want, mask) <= TOL
    for (f0, b0), (f1, b1) in zip(before, after):
        assert f1 == f0 + 1 and b1 == b0, bt_plugin.explain(model)
    assert all(r.reason is None for r in reports(model)), bt_plugin.explain(model)


def run(model, ids, mask, **kwargs):
    with torch.inference_mode():
        return model(ids, attention_mask=mask, **kwargs)


# ----------------------------------------------------------------------------- grad and autocast


def test_grad_enabled_falls_back(model_dir):
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)
    before = counts(conv)
    got = conv(ids, attention_mask=mask).last_hidden_state  # plain call: grad on, params require grad
    want = stock(ids, attention_mask=mask).last_hidden_state
    assert got.requires_grad and got.grad_fn is not None
    assert max_diff_on_real(got.detach(), want.detach(), mask) <= TOL
    assert_fell_back(conv, before, "grad")
    # The graph really reaches the weights (stock forward was used).
    got[mask.bool()].sum().backward()
    assert conv.encoder.layer[0].attention.self.query.weight.grad is not None
    assert_fused_again(conv, stock)
    with torch.no_grad():  # no_grad serves too, not only inference_mode
        before = counts(conv)
        conv(ids, attention_mask=mask)
        assert all(f1 == f0 + 1 for (f0, _), (f1, _) in zip(before, counts(conv)))


def test_autocast_is_served_and_only_fastpath_falls_back_under_it(model_dir):
    """Under autocast `auto` runs packed (fastpath's fused kernel computes in its weights' dtype):
    fused, and what stock computes under the same autocast; `kernel="fastpath"` falls back with
    the reason."""
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)
    before = counts(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(conv, ids, mask).last_hidden_state
        want = run(stock, ids, mask).last_hidden_state
    assert got.dtype == want.dtype
    assert max_diff_on_real(got.float(), want.float(), mask) <= 1e-2
    assert all(f1 == f0 + 1 and b1 == b0 for (f0, b0), (f1, b1) in zip(before, counts(conv)))
    assert all(report.kernel == "packed" for report in reports(conv))
    _, fast = pair(model_dir, kernel="fastpath")
    before = counts(fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(fast, ids, mask).last_hidden_state
    assert max_diff_on_real(got.float(), want.float(), mask) <= 1e-2
    assert_fell_back(fast, before, "autocast was enabled on cpu (fastpath")
    assert_fused_again(fast, stock)


# ----------------------------------------------------------------------------- recorded outputs


def test_output_attentions_falls_back_and_matches_stock(model_dir):
    stock, conv = pair(model_dir, attn_implementation="eager")
    ids, mask = padded_batch(LENGTHS, seed=1)
    before = counts(conv)
    got, want = run(conv, ids, mask, output_attentions=True), run(stock, ids, mask, output_attentions=True)
    assert got.attentions is not None and len(got.attentions) == LAYERS
    for a, b in zip(got.attentions, want.attentions):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=TOL, rtol=0)
    assert max_diff_on_real(got.last_hidden_state, want.last_hidden_state, mask) <= TOL
    assert_fell_back(conv, before, "output_attentions")
    # The recording hooks stay installed; they must not block the next call.
    assert_fused_again(conv, stock)


def test_output_hidden_states_runs_fused_and_later_calls_stay_fused(model_dir):
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)
    before = counts(conv)
    got = run(conv, ids, mask, output_hidden_states=True)
    want = run(stock, ids, mask, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == LAYERS + 1
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert not a.is_nested and a.shape == b.shape
        assert max_diff_on_real(a, b, mask) <= TOL
    assert max_diff_on_real(got.last_hidden_state, want.last_hidden_state, mask) <= TOL
    after = counts(conv)
    assert all(f1 == f0 + 1 and b1 == b0 for (f0, b0), (f1, b1) in zip(before, after)), bt_plugin.explain(conv)
    # transformers 5 left its recording hooks installed on the layers ...
    assert any(len(layer._forward_hooks) for layer in conv.encoder.layer) == records_with_hooks()
    # ... which must not turn every later call into a silent fallback.
    assert_fused_again(conv, stock)
    assert_fused_again(conv, stock, output_hidden_states=True)
    assert_fused_again(conv, stock, lengths=[16, 16, 16, 16])
    assert totals(conv)[1] == 0


# ----------------------------------------------------------------------------- masks


def test_left_padded_mask_falls_back(model_dir):
    """fastpath builds nested tensors from right-padded masks only (packed takes any mask)."""
    stock, conv = pair(model_dir, kernel="fastpath")
    ids, mask = padded_batch(LENGTHS, seed=1)
    ids, mask = ids.flip(1), mask.flip(1)  # left padding
    before = counts(conv)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert max_diff_on_real(got, want, mask) <= TOL
    assert_fell_back(conv, before, "right-padded")
    assert_fused_again(conv, stock)


def test_row_without_real_tokens_falls_back(model_dir):
    stock, conv = pair(model_dir, kernel="fastpath")
    ids, mask = padded_batch(LENGTHS, seed=1)
    mask[2] = 0
    before = counts(conv)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert got.shape == want.shape
    assert max_diff_on_real(got, want, mask) <= TOL
    assert_fell_back(conv, before, "no real token")
    assert_fused_again(conv, stock)


# ----------------------------------------------------------------------------- hooks and adapters


@pytest.mark.parametrize("where", ["layer", "query"])
def test_user_forward_hook_falls_back_and_runs(model_dir, where):
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)
    seen = []

    def hook(module, args, output):
        seen.append(type(hidden_of(output)))
        if isinstance(output, tuple):  # transformers 4.x layers return (hidden_states, ...)
            return (output[0] * 1.01,) + output[1:]
        return output * 1.01  # the hook changes the result: ignoring it would show

    def target(model):
        layer = model.encoder.layer[1]
        return layer if where == "layer" else layer.attention.self.query

    handles = [target(m).register_forward_hook(hook) for m in (stock, conv)]
    before = counts(conv)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert seen == [torch.Tensor, torch.Tensor]  # called on both, with a plain (B, L, E) tensor
    assert max_diff_on_real(got, want, mask) <= TOL
    assert_fell_back(conv, before, "hooks", layers=[1])
    if where == "query":
        assert "attention.self.query" in reports(conv)[1].reason
    for handle in handles:
        handle.remove()
    assert_fused_again(conv, stock)


def test_forward_pre_hook_falls_back(model_dir):
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)

    def pre_hook(module, args):
        return (args[0] * 0.5,)

    handles = [m.encoder.layer[0].attention.self.key.register_forward_pre_hook(pre_hook) for m in (stock, conv)]
    before = counts(conv)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert max_diff_on_real(got, want, mask) <= TOL
    assert_fell_back(conv, before, "hooks", layers=[0])
    for handle in handles:
        handle.remove()
    assert_fused_again(conv, stock)


class Adapter(nn.Module):
    """Stands in for a LoRA-style wrapper: another module type that calls the original Linear."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_replaced_query_module_runs_the_layer_code_padding_free(model_dir):
    """A replaced projection (an adapter) is no plain Linear: that layer runs its own code on the
    packed tokens instead of the fused kernel; the others stay fused."""
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)
    attn = conv.encoder.layer[0].attention.self
    original = attn.query
    attn.query = Adapter(original)
    before = counts(conv)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert max_diff_on_real(got, want, mask) <= TOL
    after = counts(conv)
    layers = bt_plugin.explain(conv).layers
    if layer_code_reason(conv.encoder.layer[0]._bt_spec):  # BERT's own attention code (transformers 4.x)
        assert [b - b0 for (_, b0), (_, b) in zip(before, after)] == [1] + [0] * (len(after) - 1)
        assert "attention.self.query" in layers[0].reason and "not torch.nn.Linear" in layers[0].reason
        assert [f - f0 for (f0, _), (f, _) in zip(before, after)] == [0] + [1] * (len(after) - 1)
    else:
        assert [f - f0 for (f0, _), (f, _) in zip(before, after)] == [1] * len(after)
        assert [b - b0 for (_, b0), (_, b) in zip(before, after)] == [0] * len(after)
        assert layers[0].kernel == "layercode" and "attention.self.query" in layers[0].note
    assert all(layer.kernel != "layercode" for layer in layers[1:])
    attn.query = original
    assert_fused_again(conv, stock)


def test_a_replaced_module_in_a_layer_without_attention_interface_falls_back(model_dir):
    """A spec that does not promise transformers' attention interface has no layer-code path."""
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)
    layer = conv.encoder.layer[0]
    spec = layer._bt_spec
    attn = layer.attention.self
    original = attn.query
    attn.query = Adapter(original)
    layer.__class__._bt_spec = dataclasses.replace(spec, attention_interface=False)
    try:
        before = counts(conv)
        got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
        assert max_diff_on_real(got, want, mask) <= TOL
        assert_fell_back(conv, before, "attention.self.query", layers=[0])
    finally:
        layer.__class__._bt_spec = spec
        attn.query = original
    assert_fused_again(conv, stock)


# ----------------------------------------------------------------------------- direct layer calls


def _key_padding_mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = attend: the same key-padding row for every query."""
    batch, length = mask.shape
    return mask.bool()[:, None, None, :].expand(batch, 1, length, length)


def test_mask_differing_between_query_rows_falls_back(model_dir):
    stock, conv = pair(model_dir)
    layer, stock_layer = conv.encoder.layer[-1], stock.encoder.layer[-1]
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 256)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None].expand(3, 1, 10, 10)
    before = counts(conv)
    with torch.inference_mode():
        got = hidden_of(layer(hidden, causal))
        want = hidden_of(BertLayer.forward(stock_layer, hidden, causal))
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert_fell_back(conv, before, "query rows", layers=[LAYERS - 1])

    # A key-padding mask in the same 4-D form is served by the kernel.
    pad = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7])
    before = counts(conv)
    with torch.inference_mode():
        got = hidden_of(layer(hidden, _key_padding_mask_4d(pad)))
        want = hidden_of(BertLayer.forward(stock_layer, hidden, _key_padding_mask_4d(pad)))
    assert not got.is_nested and got.shape == want.shape
    assert max_diff_on_real(got, want, pad) <= TOL
    assert counts(conv)[-1] == (before[-1][0] + 1, before[-1][1])


@pytest.mark.parametrize("index", range(LAYERS))
def test_direct_call_of_any_layer_returns_dense_tensor(model_dir, index):
    """A fused layer called on its own (not by the encoder loop) must return what the stock
    layer returns: a (B, L, E) tensor, not the packed nested tensor the stack uses internally."""
    stock, conv = pair(model_dir)
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 256)
    pad = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7])
    with torch.inference_mode():
        out = conv.encoder.layer[index](hidden, _key_padding_mask_4d(pad))
        stock_out = BertLayer.forward(stock.encoder.layer[index], hidden, _key_padding_mask_4d(pad))
        assert type(out) is type(stock_out)  # the stock return convention: a tensor or a tuple
        got, want = hidden_of(out), hidden_of(stock_out)
    assert isinstance(got, torch.Tensor) and not got.is_nested
    assert got.shape == want.shape
    assert max_diff_on_real(got, want, pad) <= TOL


def test_layer_list_truncated_after_convert(model_dir):
    """Dropping layers after conversion (e.g. `encoder.layer = encoder.layer[:1]`) must still work."""
    stock, conv = pair(model_dir)
    stock.encoder.layer = stock.encoder.layer[:1]
    conv.encoder.layer = conv.encoder.layer[:1]
    ids, mask = padded_batch(LENGTHS, seed=1)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert not got.is_nested and got.shape == want.shape
    assert max_diff_on_real(got, want, mask) <= TOL


def test_a_forward_replaced_on_a_submodule_falls_back_and_runs(model_dir):
    """A patched submodule (`module.forward = fn`) would be skipped by a fused kernel: stock runs it."""
    stock, conv = pair(model_dir)
    ids, mask = padded_batch(LENGTHS, seed=1)
    for model in (stock, conv):
        dense = model.encoder.layer[1].intermediate.dense
        dense.forward = (lambda linear: lambda x: torch.nn.functional.linear(x, linear.weight, linear.bias) * 1.01)(dense)
    before = counts(conv)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert max_diff_on_real(got, want, mask) <= TOL
    assert_fell_back(conv, before, "was replaced on the instance", layers=[1])
    for model in (stock, conv):
        del model.encoder.layer[1].intermediate.dense.forward
    assert_fused_again(conv, stock)


def test_a_layer_whose_return_convention_cannot_be_observed_runs_stock(model_dir, monkeypatch):
    """The fused kernels learn whether a layer returns a tensor or a tuple from one stock call on
    a single zero token; a layer that fails that probe runs stock, with the reason, every call."""
    from bt_plugin.dispatch import calls

    import functools

    stock, conv = pair(model_dir)
    original = BertLayer.forward

    @functools.wraps(original)  # the same signature: the call's arguments still bind by name
    def refuses_one_token(self, hidden_states, *args, **kwargs):
        if hidden_states.shape[1] == 1:
            raise RuntimeError("one token is not enough")
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(BertLayer, "forward", refuses_one_token)
    monkeypatch.setattr(calls, "_returns", {})  # not observed yet in this process
    ids, mask = padded_batch(LENGTHS, seed=1)
    before = counts(conv)
    got, want = run(conv, ids, mask).last_hidden_state, run(stock, ids, mask).last_hidden_state
    assert max_diff_on_real(got, want, mask) <= TOL
    assert_fell_back(conv, before, "return convention could not be observed")
    assert "one token is not enough" in reports(conv)[0].reason
    assert BertLayer not in calls._returns  # a failed probe is not remembered as an answer


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parameters_made_under_inference_mode_are_refused_with_the_reason_and_stay_stock(model_dir, precision):
    """Parameters created under torch.inference_mode() count no versions and cannot be re-pointed into one
    q/k/v storage (before: the fused kernel raised reading their versions, and a converted layer's own
    linears raised inside stock's code): convert names the reason (strict) or leaves the model stock
    (strict=False); a converted model deep-copied under inference mode runs stock per call, with the
    reason, equal to stock, its parameters untouched."""
    import copy

    from bt_plugin.dispatch.eligibility import INFERENCE_PARAMETERS

    ids, mask = padded_batch(LENGTHS)
    loaded = load(model_dir)
    with torch.inference_mode():  # (from_pretrained there still makes plain parameters)
        made_there = copy.deepcopy(loaded)
    assert made_there.encoder.layer[0].output.dense.weight.is_inference()
    with pytest.raises(ValueError, match="inference tensors"):
        bt_plugin.convert(made_there, precision=precision)
    assert not bt_plugin.is_converted(bt_plugin.convert(made_there, precision=precision, strict=False))
    stock, converted = pair(model_dir)
    bt_plugin.convert(converted, precision=precision)
    with torch.inference_mode():
        copied = copy.deepcopy(converted)
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = copied(input_ids=ids, attention_mask=mask).last_hidden_state
    query = copied.encoder.layer[0].attention.self.query.weight
    assert query.is_inference() and counts(copied) == [(0, 1)] * LAYERS
    assert all(layer.reason == INFERENCE_PARAMETERS for layer in bt_plugin.explain(copied).layers)
    if precision == "fp32":
        assert max_diff_on_real(got, want, mask) <= TOL
    else:  # the stock forward under the precision's autocast
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        assert max_diff_on_real(got.float(), want.float(), mask) <= 1e-2
