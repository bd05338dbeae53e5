"""The private torch operators bt_plugin calls (bt_plugin.kernels.torch_ops): every one is present and
takes the kernels' arguments on the running torch, and a torch that lacks one, or whose signature
changed, turns off only the kernel that needs it, with the reason in `explain()`, while the model's
outputs equal stock (simulated here by monkeypatching the operator away or replacing it).

Against stock transformers, on models saved and loaded back through `from_pretrained`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import BertConfig, BertModel

import bt_plugin
from bt_plugin.kernels import resolve_kernel_name, torch_ops
from bt_plugin.kernels.linear import PREPACK_OPS

from support import VOCAB, max_diff_on_real, padded_batch, stock_and_converted

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("hf_offline")


def _config():
    # the feed-forward weight is linear.ONEDNN_MIN_WEIGHT elements: the smallest layer prepack=True prepacks
    return BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=1024)


def _outputs(stock, converted, lengths):
    ids, mask = padded_batch(lengths, seed=2, pad_token=0)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    return max_diff_on_real(want, got, mask)


@pytest.mark.parametrize("name", list(torch_ops.OPS))
def test_every_private_operator_serves_the_running_torch(name):
    """On every torch CI tests, each operator is there and takes the arguments the kernels pass
    (oneDNN's only where this build has oneDNN)."""
    if torch_ops.OPS[name].needs_onednn and not torch.backends.mkldnn.is_available():
        assert "no oneDNN" in torch_ops.reason(name)
    else:
        assert torch_ops.reason(name) is None


def _changed_signature(src, embed_dim, num_heads):  # what a torch that reshaped the operator would have
    raise AssertionError("never reached with the kernels' twenty arguments")


@pytest.mark.parametrize("op,how", [
    ("_transformer_encoder_layer_fwd", "missing"), ("_nested_tensor_from_mask", "missing"),
    ("_transformer_encoder_layer_fwd", "changed"),
])
def test_fastpath_is_off_with_the_reason_where_torch_lacks_its_operator(monkeypatch, forget_private_ops, op, how):
    if how == "missing":
        monkeypatch.delattr(torch, op)
    else:
        monkeypatch.setattr(torch, op, _changed_signature)
    forget_private_ops.forget()
    stock, converted = stock_and_converted(BertModel, _config(), kernel="fastpath")
    assert _outputs(stock, converted, [9, 3, 14]) <= ATOL
    expected = f"has no torch.{op}" if how == "missing" else f"torch.{op} failed a call"
    report = bt_plugin.explain(converted)  # the model stayed stock; the report names the operator
    assert report.fused_layers == 0 and expected in str(report), str(report)
    assert any(expected in line for line in report.unavailable_ops)
    judged = bt_plugin.explain(converted, kernel="fastpath")  # each layer's reason for the kernel asked for
    assert all(expected in layer.reason for layer in judged.layers), str(judged)
    # auto never picks a kernel whose operator is missing (CUDA's table says fastpath)
    assert resolve_kernel_name("auto", "cuda") == "packed"


@pytest.mark.parametrize("lengths", [[11], [9, 3, 14]])
def test_packed_runs_op_by_op_where_torch_lacks_the_fused_layer(monkeypatch, forget_private_ops, lengths):
    """The packed kernel hands a call with nothing padded to torch's fused layer; without it, it
    runs its own ops: fused, counted and equal to stock."""
    monkeypatch.delattr(torch, "_transformer_encoder_layer_fwd")
    forget_private_ops.forget()
    stock, converted = stock_and_converted(BertModel, _config(), kernel="packed")
    assert _outputs(stock, converted, lengths) <= ATOL
    report = bt_plugin.explain(converted)
    assert all(layer.fused_calls == 1 and not layer.reason for layer in report.layers), str(report)


def test_prepacked_weights_are_off_where_torch_lacks_onednn_ops(monkeypatch, forget_private_ops):
    """Without oneDNN's operators (a torch that renamed them), prepack=True holds nothing and the
    plain weights serve; the linear library falls back to MKL on every CPU vendor."""
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    forget_private_ops.forget()
    assert not torch_ops.available(*PREPACK_OPS)
    stock, converted = stock_and_converted(BertModel, _config(), kernel="packed", prepack=True)
    assert _outputs(stock, converted, [9, 3, 14]) <= ATOL
    report = bt_plugin.explain(converted)
    assert report.held_bytes == 0 and report.fused_layers == 2
    assert all(layer.fused_calls == 1 for layer in report.layers)
    assert any("torch.ops.mkldnn._reorder_linear_weight" in line for line in report.unavailable_ops)
    from bt_plugin.kernels import linear

    monkeypatch.setattr(linear, "cpu_vendor", lambda: "AuthenticAMD")  # the vendor whose table says oneDNN
    assert linear.linear_library() == "torch"


SCRIPT = """
import torch
del torch._transformer_encoder_layer_fwd, torch._nested_tensor_from_mask  # a torch that renamed them
import bt_plugin
from transformers import BertModel
stock = BertModel.from_pretrained({path!r}).eval()
with bt_plugin.enabled(kernel="fastpath"):
    converted = BertModel.from_pretrained({path!r}).eval()
ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
mask = (ids != 0).long()
with torch.inference_mode():
    diff = (stock(input_ids=ids, attention_mask=mask).last_hidden_state
            - converted(input_ids=ids, attention_mask=mask).last_hidden_state)[mask.bool()].abs().max().item()
print("diff", diff)
print(bt_plugin.explain(converted))
"""


def test_a_torch_without_the_operators_imports_and_runs_bt_plugin(tmp_path):
    """The operators removed before bt_plugin is imported (nothing looks them up at import): the
    user's forward runs stock with the reason, no exception."""
    BertModel(_config()).save_pretrained(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("BT_PLUGIN", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(tmp_path))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    diff = float(done.stdout.split("diff ", 1)[1].split()[0])
    assert diff <= ATOL
    assert "0/2 encoder layers converted" in done.stdout
    assert "has no torch._transformer_encoder_layer_fwd" in done.stdout, done.stdout
