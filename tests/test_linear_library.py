"""The packed kernel's linears through either library equal stock transformers; the per-vendor table decides."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import bt_plugin
from bt_plugin.kernels import device_table
from bt_plugin.kernels import linear as linear_module
from support import VOCAB, max_diff_on_real, model_class, padded_batch, save_model, stock_and_converted

ATOL = 1e-5


@pytest.fixture
def library(monkeypatch, request):
    """Force the packed kernel's float32 linears onto one library for the test."""
    monkeypatch.setattr(linear_module, "linear_library", lambda: request.param)
    return request.param


@pytest.mark.parametrize("library", linear_module.LINEAR_LIBRARIES, indirect=True)
def test_packed_model_equals_stock_with_either_library(tmp_path, library):
    if library == "onednn" and not linear_module.onednn_available():
        pytest.fail("this torch build has no oneDNN linear: the onednn library cannot be chosen here")
    path = save_model("bert", tmp_path)
    stock = model_class("bert").from_pretrained(path).eval()
    converted = bt_plugin.convert(model_class("bert").from_pretrained(path).eval(), kernel="packed")
    ids, mask = padded_batch([9, 2, 14, 5], seed=5, pad_token=0)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_real(want, got, mask) <= ATOL
    assert all(layer.fused_calls == 1 for layer in bt_plugin.explain(converted).layers)


@pytest.mark.parametrize("library", ["onednn"], indirect=True)
@pytest.mark.parametrize("rows", [1, 3, 14, 130])
def test_onednn_linear_equals_f_linear_and_steps_aside_where_it_must(library, rows):
    # a weight oneDNN takes, at a trained model's scale (outputs of order 1, as the parity tests compare)
    x, weight, bias = torch.randn(rows, 384), 0.05 * torch.randn(768, 384), torch.randn(768)
    with torch.inference_mode():
        assert linear_module.library_for(x, weight, bias) == "onednn"
        assert (linear_module.linear(x, weight, bias) - F.linear(x, weight, bias)).abs().max() <= ATOL
        assert (linear_module.linear(x, weight, None) - F.linear(x, weight)).abs().max() <= ATOL
        # a small linear, below the work that repays oneDNN's per-call cost, stays with F.linear
        small = torch.randn(rows, 32), torch.randn(96, 32), torch.randn(96)
        assert linear_module.library_for(*small) == "torch"
        assert torch.equal(linear_module.linear(*small), F.linear(*small))
        half = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
        assert linear_module.library_for(*half) == "torch"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_module.library_for(x, weight, bias) == "torch"
            assert linear_module.linear(x, weight, bias).dtype is torch.bfloat16
    # autograd gets F.linear itself: gradients flow
    x.requires_grad_(True)
    assert linear_module.library_for(x, weight, bias) == "torch"
    assert linear_module.linear(x, weight, bias).requires_grad


def test_the_vendor_table_picks_the_library(monkeypatch):
    monkeypatch.setattr(linear_module, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(device_table, "LINEAR_BY_CPU_VENDOR", {"AuthenticAMD": "onednn"})
    assert linear_module.linear_library() == ("onednn" if linear_module.onednn_available() else "torch")
    monkeypatch.setattr(linear_module, "cpu_vendor", lambda: "GenuineIntel")
    assert linear_module.linear_library() == "torch"


@pytest.mark.parametrize("library", ["torch"], indirect=True)
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 15, 16, 64])
def test_a_few_rows_times_a_large_weight_run_in_pieces_equal_to_one_call(library, rows, monkeypatch):
    """MKL's slow path for 3-15 rows (linear.SPLIT_ROWS): the product in pieces of the weight's
    output rows equals F.linear; outside the range, and for small weights, F.linear runs once."""
    x, weight, bias = torch.randn(rows, 512), 0.05 * torch.randn(3072, 512), torch.randn(3072)
    calls = []
    real = F.linear
    monkeypatch.setattr(linear_module.F, "linear", lambda *args: calls.append(args[1].shape) or real(*args))
    with torch.inference_mode():
        for b in (bias, None):
            calls.clear()
            got = linear_module.linear(x, weight, b)
            assert got.shape == (rows, 3072) and (got - real(x, weight, b)).abs().max() <= ATOL
            inside = linear_module.SPLIT_ROWS[0] <= rows <= linear_module.SPLIT_ROWS[1]
            assert len(calls) == (round(weight.numel() / linear_module.SPLIT_PIECE) if inside else 1)
        small = torch.randn(rows, 384), torch.randn(1152, 384), torch.randn(1152)
        calls.clear()
        assert torch.equal(linear_module.linear(*small), real(*small)) and len(calls) == 1
    calls.clear()
    x.requires_grad_(True)  # autograd gets F.linear itself
    assert linear_module.linear(x, weight, bias).requires_grad and len(calls) == 1


@pytest.mark.parametrize("library", ["torch"], indirect=True)
@pytest.mark.parametrize("length", [6, 12, 40])
def test_one_short_text_through_large_linears_equals_stock(tmp_path, library, length):
    """A text short enough for the pieces (and a longer one, for torch's fused layer): the packed
    kernel's output equals stock's, every layer fused."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                     intermediate_size=3072)
    stock, converted = stock_and_converted(transformers.BertModel, config, kernel="packed")
    ids, mask = padded_batch([length], seed=3, pad_token=0)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_real(want, got, mask) <= ATOL
    assert all(layer.fused_calls == 1 for layer in bt_plugin.explain(converted).layers)
