"""The packed kernel serves what PyTorch's fused kernel cannot, exactly; kernel choice by name."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import bt_plugin
from bt_plugin.kernels import LayerTensors, PackedKernel
from support import max_diff_on_real, model_class, padded_batch, save_model

ATOL = 1e-5


def _pair(tmp_path, kernel, modify=None, **overrides):
    path = save_model("bert", tmp_path, **overrides)
    stock = model_class("bert").from_pretrained(path).eval()
    converted = model_class("bert").from_pretrained(path).eval()
    if modify:
        modify(stock)
        modify(converted)
    return stock, bt_plugin.convert(converted, kernel=kernel)


def _assert_parity_and_fused(stock, converted, lengths=(9, 2, 14, 5)):
    ids, mask = padded_batch(list(lengths), seed=3, pad_token=0)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_real(want, got, mask) <= ATOL
    report = bt_plugin.explain(converted)
    assert all(layer.fused_calls == 1 and layer.fallback_calls == 0 for layer in report.layers), str(report)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu", "gelu"])
def test_packed_computes_every_activation_exactly(tmp_path, act):
    stock, converted = _pair(tmp_path, "packed", hidden_act=act)
    _assert_parity_and_fused(stock, converted)


@pytest.mark.parametrize("act", ["gelu_new", "quick_gelu", "silu"])
def test_fastpath_refuses_other_activations_with_a_reason(tmp_path, act):
    path = save_model("bert", tmp_path, hidden_act=act)
    model = model_class("bert").from_pretrained(path).eval()
    with pytest.raises(ValueError, match="activation was"):
        bt_plugin.convert(model, kernel="fastpath")
    report = bt_plugin.explain(model, kernel="fastpath")
    assert "activation was" in report.layers[0].reason and not report.layers[0].converted
    assert bt_plugin.explain(model, kernel="packed").layers[0].reason == "not converted (call bt_plugin.convert)"


def test_odd_head_count(tmp_path):
    stock, converted = _pair(tmp_path, "packed", hidden_size=288, num_attention_heads=3)
    _assert_parity_and_fused(stock, converted)
    with pytest.raises(ValueError, match="odd"):
        bt_plugin.convert(model_class("bert").from_pretrained(str(tmp_path)).eval(), kernel="fastpath")


def _drop_biases(model):
    for layer in model.encoder.layer:
        layer.attention.self.key.bias = None  # Whisper-style k_proj
        layer.attention.output.dense.bias = None
        layer.output.LayerNorm.bias = None


def test_missing_biases_and_differing_eps(tmp_path):
    def modify(model):
        _drop_biases(model)
        for layer in model.encoder.layer:
            layer.output.LayerNorm.eps = 1e-5  # norm1 keeps BERT's 1e-12
    stock, converted = _pair(tmp_path, "packed", modify=modify)
    _assert_parity_and_fused(stock, converted)
    # no weight is held twice: q and v biases are slices of the fused bias, k's slot is zeros
    layer = converted.encoder.layer[0]
    fused_bias = layer.in_proj_bias
    assert layer.attention.self.query.bias.data_ptr() == fused_bias.data_ptr()
    assert torch.equal(fused_bias[256:512], torch.zeros(256))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-ln", "pre-ln"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_packed_layer_equals_torch_transformer_encoder_layer(norm_first, activation):
    """Against PyTorch's own reference layer (its slow path), with a key-padding mask."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation=activation,
                                     batch_first=True, norm_first=norm_first).eval()
    ref.norm2.eps = 1e-6
    x = torch.randn(3, 7, 64)
    keep = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 2 + [1] * 4 + [0]], dtype=torch.bool)
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = ref(x, src_key_padding_mask=~keep)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        a = ref.self_attn
        t = LayerTensors(
            a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
            ref.linear1.weight, ref.linear1.bias, ref.linear2.weight, ref.linear2.bias,
            ref.norm1.weight, ref.norm1.bias, ref.norm2.weight, ref.norm2.bias, ref.norm1.eps,
            4, 64, norm_first, activation, ref.norm2.eps, ref.activation,
        )
        kernel = PackedKernel()
        packed, state = kernel.pack(x, keep)
        got = kernel.unpack(kernel.layer(packed, t, state), state)
    assert max_diff_on_real(want, got, keep) <= ATOL
    assert bool((got[~keep] == 0).all())


def test_auto_picks_packed_on_cpu_and_explain_names_it(tmp_path):
    stock, converted = _pair(tmp_path, "auto")
    assert {layer.kernel for layer in bt_plugin.explain(converted).layers} == {"packed"}
    _assert_parity_and_fused(stock, converted)


@pytest.mark.parametrize("kernel", ["fastpath", "packed"])
def test_enable_kernel_choice_reaches_loaded_layers(tmp_path, kernel):
    path = save_model("bert", tmp_path)
    bt_plugin.enable(kernel=kernel)
    model = model_class("bert").from_pretrained(path)
    assert {layer.kernel for layer in bt_plugin.explain(model).layers} == {kernel}


def test_bt_plugin_kernel_environment_variable(tmp_path):
    path = save_model("bert", tmp_path)
    script = (
        "import bt_plugin; from transformers import BertModel\n"
        f"m = BertModel.from_pretrained({str(path)!r})\n"
        "print(sorted({l.kernel for l in bt_plugin.explain(m).layers}))\n"
    )
    env = dict(os.environ, BT_PLUGIN="1", BT_PLUGIN_KERNEL="fastpath", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['fastpath']"
    env["BT_PLUGIN_KERNEL"] = "nope"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert "valid kernels: auto, fastpath, packed" in out.stderr  # a warning, and the plugin stays off


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["packed", "fastpath"])
def test_half_precision_runs_packed_or_falls_back_cleanly(tmp_path, dtype, kernel):
    """packed runs the same torch ops as stock in bf16/fp16; fastpath (fp32 only on CPU) falls back."""
    path = save_model("bert", tmp_path)
    stock = model_class("bert").from_pretrained(path).to(dtype).eval()
    converted = bt_plugin.convert(model_class("bert").from_pretrained(path).to(dtype).eval(), kernel=kernel)
    ids, mask = padded_batch([9, 2, 14, 5], seed=3, pad_token=0)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        got = converted(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    real = mask.bool()
    assert (want - got)[real].abs().max().item() <= 0.05  # a few bf16 ulps at |x| ~ 4; same ops
    report = bt_plugin.explain(converted)
    if kernel == "packed":
        assert all(layer.fused_calls == 1 and layer.fallback_calls == 0 for layer in report.layers), str(report)
    else:
        assert all(layer.fallback_calls == 1 and "dtype was" in layer.reason for layer in report.layers), str(report)
        assert torch.equal(want, got)  # the stock forward ran


def test_small_batches_attend_in_one_masked_call_equal_to_per_sequence_attention():
    """The one-call attention of a small batch (padded keys masked) computes what one call per
    sequence computes; long batches keep one call per sequence."""
    from bt_plugin.kernels import packed as packed_module

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    keep = torch.zeros(4, 9, dtype=torch.bool)
    for row, length in enumerate((9, 6, 3, 1)):
        keep[row, :length] = True
    kernel = packed_module.PackedKernel()
    hidden = torch.randn(4, 9, 32)
    carrier, state = kernel.pack(hidden, keep)
    assert packed_module._padded_is_cheaper(state)
    long_keep = torch.ones(2, 512, dtype=torch.bool)
    long_keep[1, 100:] = False
    assert not packed_module._padded_is_cheaper(kernel.pack(torch.randn(2, 512, 32), long_keep)[1])
    qkv = torch.nn.functional.linear(carrier, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)
    t = type("T", (), {"num_heads": 4, "embed_dim": 32, "attention_scale": None})()
    one_call = packed_module._padded_sdpa(qkv, state, t)
    per_sequence = torch.cat([packed_module._sdpa(qkv[start:start + count], 1, count, t)
                              for start, count in state.segments])
    assert one_call.shape == per_sequence.shape
    assert (one_call - per_sequence).abs().max().item() <= 1e-6


@pytest.mark.parametrize("fastpath_enabled", [True, False])
@pytest.mark.parametrize("act,one_call", [("gelu", True), ("relu", True), ("gelu_new", False)])
@pytest.mark.parametrize("lengths", [(11,), (6, 6, 6)])
def test_a_call_with_nothing_padded_runs_torchs_fused_layer_once_per_layer(tmp_path, monkeypatch, act, one_call,
                                                                            lengths, fastpath_enabled,
                                                                            forget_private_ops):
    """Where nothing is padded (one sequence, or rows of one length) packed hands each layer torch's
    fused encoder-layer kernel when that kernel computes it exactly; else (gelu_new, or the
    fastpath switched off) its own ops. Either way the output equals stock."""
    stock, converted = _pair(tmp_path, "packed", hidden_act=act)
    calls = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or fused(*a))
    forget_private_ops.forget()
    assert forget_private_ops.available(forget_private_ops.ENCODER_LAYER)  # its probe call, before the count
    ids, mask = padded_batch(list(lengths), seed=5, pad_token=0)
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath_enabled)
    try:
        with torch.inference_mode():
            want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
            calls.clear()
            got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    assert max_diff_on_real(want, got, mask) <= ATOL
    layers = converted.config.num_hidden_layers
    assert len(calls) == (layers if one_call and fastpath_enabled else 0)
    assert all(layer.fused_calls == 1 for layer in bt_plugin.explain(converted).layers)


@pytest.mark.parametrize("prepack", [False, True])
def test_later_layers_called_as_the_first_are_not_checked_again(tmp_path, monkeypatch, prepack):
    """A stack packed by its first layer: the later layers, called with the same arguments, run
    their kernels without binding the call again (one bind per stack call, not one per layer),
    and their counters and precision labels say what ran, as the first layer's do."""
    from bt_plugin.dispatch import layer as layer_module

    stock, converted = _pair(tmp_path, "packed")
    bt_plugin.convert(converted, kernel="packed", prepack=prepack)
    binds = []
    bind = layer_module.bind
    monkeypatch.setattr(layer_module, "bind", lambda *a: binds.append(1) or bind(*a))
    ids, mask = padded_batch([9, 2, 14, 5], seed=3, pad_token=0)
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_real(want, got, mask) <= ATOL
    assert len(binds) == 1
    report = bt_plugin.explain(converted)
    labels = {layer.precision for layer in report.layers}
    assert all(layer.fused_calls == 1 and layer.kernel == "packed" for layer in report.layers), str(report)
    assert len(labels) == 1 and labels.pop() == report.layers[0].precision
    assert ("(prepacked)" in report.layers[-1].precision) == (prepack and report.prepack)
