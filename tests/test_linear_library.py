"""The packed kernel's linears through either library equal stock transformers; the per-vendor table decides."""

import pytest
import torch
import torch.nn.functional as F

import bt_plugin
from bt_plugin.kernels import device_table
from bt_plugin.kernels import linear as linear_module
from support import max_diff_on_real, model_class, padded_batch, save_model

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
