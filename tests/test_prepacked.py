"""The opt-in prepacked weight copy (`prepack=True`, `BT_PLUGIN_PREPACK=1`) and the derived weights
bt_plugin holds beside the parameters (bt_plugin.dispatch.derived): outputs equal stock, the bytes
are reported, the copy follows the parameters, stays out of the state_dict and goes with revert()
and pickling; the fused activations equal the separate ones.

Against stock transformers, on models saved and loaded back through `from_pretrained`.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AlbertConfig, AlbertModel, BertConfig, BertModel

import bt_plugin
from bt_plugin.kernels.linear import FUSED_ACTIVATIONS, PrepackedLinears, prepack_available

from support import VOCAB, max_diff_on_real, padded_batch, stock_and_converted

ATOL = 1e-5
pytestmark = [pytest.mark.usefixtures("hf_offline"),
              pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN prepacking")]


def _bert(**overrides):
    # a feed-forward weight of linear.ONEDNN_MIN_WEIGHT elements: the smallest layer prepack=True prepacks
    return BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=1024, **overrides)


def _batch(lengths: list[int], left: bool = False) -> dict:
    ids, mask = padded_batch(lengths, pad_token=0)
    if left:
        ids, mask = ids.flip(1), mask.flip(1)
    return {"input_ids": ids, "attention_mask": mask}


def _matrix_bytes(model) -> int:
    return sum(p.nbytes for layer in model.encoder.layer for name, p in layer.named_parameters()
               if p.dim() == 2)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_prepacked_layers_equal_stock_and_report_the_copy(act, side):
    stock, converted = stock_and_converted(BertModel, _bert(hidden_act=act), kernel="packed", prepack=True)
    batch = _batch([9, 4, 1], left=side == "left")
    with torch.inference_mode():
        want, got = stock(**batch).last_hidden_state, converted(**batch).last_hidden_state
    assert max_diff_on_real(want, got, batch["attention_mask"]) <= ATOL
    report = bt_plugin.explain(converted)
    assert report.prepack and all(layer.precision == "fp32 (prepacked)" for layer in report.layers), report
    assert report.held_bytes >= _matrix_bytes(converted)  # the matrix weights once more
    assert "held beside the parameters" in str(report)


def test_a_narrow_layer_keeps_its_plain_weights_under_the_opt_in():
    """Below linear.ONEDNN_MIN_WEIGHT (hidden 64 here) oneDNN's per-call cost outweighs the layout:
    prepack=True holds nothing there and computes on the parameters."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    stock, converted = stock_and_converted(BertModel, config, kernel="packed", prepack=True)
    batch = _batch([6, 2])
    with torch.inference_mode():
        want, got = stock(**batch).last_hidden_state, converted(**batch).last_hidden_state
    assert max_diff_on_real(want, got, batch["attention_mask"]) <= ATOL
    report = bt_plugin.explain(converted)
    assert report.held_bytes == 0 and all(layer.precision == "fp32" for layer in report.layers), report


def test_without_the_opt_in_nothing_is_held_beside_the_parameters():
    _, converted = stock_and_converted(BertModel, _bert(), kernel="packed")
    with torch.inference_mode():
        converted(**_batch([5, 3]))
    report = bt_plugin.explain(converted)
    assert report.held_bytes == 0 and not report.prepack
    assert all(layer.precision == "fp32" for layer in report.layers)


def test_the_copy_follows_the_parameters_and_goes_with_revert_and_pickling(tmp_path):
    stock, converted = stock_and_converted(BertModel, _bert(), kernel="packed", prepack=True)
    batch = _batch([7, 3])
    with torch.inference_mode():
        converted(**batch)
    keys = converted.state_dict().keys()
    assert keys == stock.state_dict().keys()  # the copy is not in the state_dict
    torch.manual_seed(9)
    other = BertModel(converted.config).eval()
    converted.load_state_dict(other.state_dict())  # in place: same storage, new values
    with torch.inference_mode():
        want, got = other(**batch).last_hidden_state, converted(**batch).last_hidden_state
    assert max_diff_on_real(want, got, batch["attention_mask"]) <= ATOL
    copied = copy.deepcopy(converted)
    assert bt_plugin.explain(copied).held_bytes == 0  # dropped, made again on first use
    with torch.inference_mode():
        assert max_diff_on_real(want, copied(**batch).last_hidden_state, batch["attention_mask"]) <= ATOL
    converted.save_pretrained(tmp_path)
    assert BertModel.from_pretrained(tmp_path).state_dict().keys() == keys
    bt_plugin.revert(converted)
    assert not any(key.startswith("_bt_") for module in converted.modules() for key in module.__dict__)


@pytest.mark.parametrize("options", [{"prepack": True}, {"precision": "bf16"}], ids=["prepack", "bf16"])
@pytest.mark.parametrize("role", ["query", "value"])
def test_the_copy_follows_an_in_place_change_of_one_projection(options, role):
    """q, k and v live in one fused weight; an in-place change of one of them alone (a hand edit,
    a weight-tying or pruning tool) must reach the derived copy too, not only the fused view."""
    stock, converted = stock_and_converted(BertModel, _bert(), kernel="packed")
    bt_plugin.convert(converted, kernel="packed", **options)
    batch = _batch([7, 3])
    with torch.inference_mode():
        converted(**batch)  # the copy is made
    assert bt_plugin.explain(converted).held_bytes > 0
    for model in (stock, converted):
        with torch.no_grad():
            getattr(model.encoder.layer[1].attention.self, role).weight.mul_(-2.0)
    with torch.inference_mode():
        want, got = stock(**batch).last_hidden_state, converted(**batch).last_hidden_state
    tolerance = ATOL if "prepack" in options else 0.05
    assert max_diff_on_real(want, got, batch["attention_mask"]) <= tolerance


def test_converting_again_without_prepack_drops_the_copy():
    stock, converted = stock_and_converted(BertModel, _bert(), kernel="packed", prepack=True)
    batch = _batch([7, 3])
    with torch.inference_mode():
        converted(**batch)
    assert bt_plugin.explain(converted).held_bytes > 0
    bt_plugin.convert(converted, kernel="packed", prepack=False)
    assert bt_plugin.explain(converted).held_bytes == 0
    with torch.inference_mode():
        got = converted(**batch).last_hidden_state
        want = stock(**batch).last_hidden_state
    assert max_diff_on_real(want, got, batch["attention_mask"]) <= ATOL
    assert bt_plugin.explain(converted).held_bytes == 0
    assert all("prepacked" not in (layer.precision or "") for layer in bt_plugin.explain(converted).layers)


def test_albert_shared_layer_prepacked_equals_stock():
    config = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=256, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=1024)
    stock, converted = stock_and_converted(AlbertModel, config, kernel="packed", prepack=True)
    batch = _batch([8, 2, 5])
    with torch.inference_mode():
        want, got = stock(**batch).last_hidden_state, converted(**batch).last_hidden_state
    assert max_diff_on_real(want, got, batch["attention_mask"]) <= ATOL


@pytest.mark.parametrize("name", sorted(FUSED_ACTIVATIONS))
def test_a_fused_activation_equals_the_separate_op(name):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 48) * 0.2, torch.randn(96), torch.randn(7, 48)
    separate = {"gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "relu": F.relu}[name]
    pair = (weight, bias)
    linears = PrepackedLinears(pair, pair, pair, pair, name, separate)
    with torch.inference_mode():
        assert (linears.up(x) - separate(F.linear(x, weight, bias))).abs().max().item() <= ATOL


@pytest.mark.parametrize("value", ["yes please", 1, None])
def test_a_bad_prepack_value_is_refused(value):
    with pytest.raises(ValueError, match="prepack must be True or False"):
        bt_plugin.convert(BertModel(_bert()).eval(), prepack=value)
    with pytest.raises(ValueError, match="prepack must be True or False"):
        bt_plugin.enable(prepack=value)


SCRIPT = """
import torch, bt_plugin
from transformers import BertModel
model = BertModel.from_pretrained({path!r}).eval()
with torch.inference_mode():
    model(input_ids=torch.tensor([[5, 6, 7, 8]]))
report = bt_plugin.explain(model)
print("PREPACK", bt_plugin.is_converted(model), report.prepack, report.held_bytes > 0)
"""


@pytest.mark.parametrize("value,expected", [("1", "PREPACK True True True"), ("0", "PREPACK True False False"),
                                            ("maybe", "PREPACK False False False")])
def test_the_environment_flag_turns_the_copy_on(tmp_path, value, expected):
    BertModel(_bert()).save_pretrained(tmp_path)
    env = dict(os.environ, BT_PLUGIN="1", BT_PLUGIN_PREPACK=value, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(tmp_path))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout, done.stdout + done.stderr
    if value == "maybe":  # malformed: the plugin stays off with a warning naming the valid values
        assert "BT_PLUGIN_PREPACK='maybe'" in done.stderr
