"""Declared version ranges, and enable/disable racing with loads."""

import logging
import threading

import pytest
from transformers import BertModel
from transformers.modeling_utils import PreTrainedModel

import bt_plugin
from bt_plugin import compat
from bt_plugin.dispatch.layer import FusedLayer
from support import save_model


def test_installed_versions_are_inside_the_declared_ranges():
    assert compat.version_warnings() == []


def test_an_unsupported_transformers_version_is_reported_once(monkeypatch, caplog):
    import importlib.metadata as metadata

    real = metadata.version
    found = {"transformers": "4.40.0", "torch": compat.TESTED_TORCH[0][0]}  # only transformers outside
    monkeypatch.setattr(metadata, "version", lambda name: found.get(name) or real(name))
    monkeypatch.setattr(compat, "_warned", set())
    lines = compat.version_warnings()
    assert len(lines) == 1 and f"transformers{compat.SUPPORTED_VERSIONS['transformers']}" in lines[0]
    assert "4.40.0" in lines[0]
    with caplog.at_level(logging.WARNING, logger="bt_plugin"):
        bt_plugin.enable()
        bt_plugin.enable()
    assert sum("found 4.40.0" in r.getMessage() for r in caplog.records) == 1


def _torch_warnings(monkeypatch, installed: str) -> list[str]:
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: installed if name == "torch" else real(name))
    return [line for line in compat.version_warnings() if "with torch" in line]


@pytest.mark.parametrize("torch_version", [row[0] for row in compat.TESTED_TORCH])
@pytest.mark.parametrize("label", ["", "+cpu", "+cu130"])
def test_every_tested_torch_is_inside_the_declared_range_whatever_its_build(monkeypatch, torch_version, label):
    """PyPI's CUDA wheels call themselves `2.14.1+cu130`, the CPU wheel `2.13.0+cpu`: the same release."""
    assert _torch_warnings(monkeypatch, torch_version + label) == []


@pytest.mark.parametrize("outside", ["2.5.1", "2.5.1+cpu", "2.16.0", "2.16.0+cu130", "3.0.0"])
def test_a_torch_outside_the_declared_range_is_reported(monkeypatch, outside):
    lines = _torch_warnings(monkeypatch, outside)
    assert len(lines) == 1 and f"torch{compat.SUPPORTED_VERSIONS['torch']}" in lines[0] and f"found {outside}" in lines[0]


def test_the_declared_torch_range_is_the_tested_one():
    """SUPPORTED_VERSIONS' torch range runs from the oldest tested torch's minor release to just past the
    newest's; pyproject.toml requires that oldest torch and the oldest tested Python (a floor CI does not
    test would be a guess) and lists each tested Python among its classifiers."""
    from packaging.version import Version

    try:
        import tomllib
    except ImportError:  # Python 3.10 (pytest brings tomli there)
        import tomli as tomllib

    from support import ROOT

    tested = sorted(Version(row[0]) for row in compat.TESTED_TORCH)
    oldest, newest = tested[0], tested[-1]
    assert compat.SUPPORTED_VERSIONS["torch"] == f">={oldest.major}.{oldest.minor},<{newest.major}.{newest.minor + 1}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch>={oldest.major}.{oldest.minor}" in project["dependencies"]
    pythons = sorted({row[1] for row in compat.TESTED_TORCH}, key=Version)
    assert project["requires-python"] == f">={pythons[0]}"
    classifiers = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")}
    assert set(pythons) <= classifiers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("bert", tmp_path_factory.mktemp("bert"), num_hidden_layers=2)


def test_enable_disable_racing_with_loads_never_half_patches(model_dir):
    original = PreTrainedModel.__dict__["from_pretrained"], PreTrainedModel.__dict__["_from_config"]
    stop = threading.Event()
    errors, loaded = [], []

    def toggle():
        while not stop.is_set():
            bt_plugin.enable()
            bt_plugin.disable()

    one_load_at_a_time = threading.Lock()  # transformers 4.51-4.53's from_pretrained swaps torch's
    # init functions and default device globally: concurrent loads corrupt each other there. The
    # toggling threads still race with every load.

    def load():
        try:
            for _ in range(6):
                with one_load_at_a_time:
                    model = BertModel.from_pretrained(model_dir)
                fused = [isinstance(layer, FusedLayer) for layer in model.encoder.layer]
                loaded.append(fused)
        except Exception as error:  # noqa: BLE001 - any error fails the test below
            errors.append(error)

    togglers = [threading.Thread(target=toggle) for _ in range(2)]
    loaders = [threading.Thread(target=load) for _ in range(3)]
    for thread in togglers + loaders:
        thread.start()
    for thread in loaders:
        thread.join()
    stop.set()
    for thread in togglers:
        thread.join()
    bt_plugin.disable()
    assert errors == []
    assert len(loaded) == 18
    assert all(all(f) or not any(f) for f in loaded)  # each model fully converted or fully stock
    assert (PreTrainedModel.__dict__["from_pretrained"], PreTrainedModel.__dict__["_from_config"]) == original


def test_disable_leaves_converted_models_converted_and_working(model_dir):
    import torch

    from support import padded_batch

    bt_plugin.enable()
    model = BertModel.from_pretrained(model_dir)
    bt_plugin.disable()
    stock = BertModel.from_pretrained(model_dir)
    assert bt_plugin.is_converted(model) and not bt_plugin.is_converted(stock)
    ids, mask = padded_batch([5, 2, 8], seed=7, pad_token=0)
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5
    assert all(layer.fused_calls == 1 for layer in bt_plugin.explain(model).layers)


def test_convert_refuses_what_is_not_a_transformers_model():
    import torch

    with pytest.raises(ValueError, match="not a transformers model"):
        bt_plugin.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bt_plugin.convert("bert-base-uncased")
    assert "not a transformers model" in bt_plugin.explain(torch.nn.Linear(2, 2)).reason


def test_every_registered_family_is_present_or_skipped_with_a_version_reason():
    from bt_plugin.loading import registry
    from bt_plugin.patches import BUILTIN_FAMILIES  # noqa: F401  (the built-ins are registered)

    present, absent = registry.all_specs(), registry.absent_families()
    assert not set(present) & set(absent)
    assert {spec.name for spec in registry.builtin_specs()} <= set(present) | set(absent)
    for name, reason in absent.items():
        assert compat.transformers_version() in reason, (name, reason)
    for spec in present.values():  # a present family's layer classes import
        assert spec.resolve_layer_classes(), spec.name


def _absent_with_a_config():
    """Absent text families whose model type transformers still has (ModernBERT before 5.1, ...);
    SEW before 5.13 is checked in tests/test_arch_audio.py."""
    import transformers

    from bt_plugin.loading import registry

    found = []
    for name, reason in registry.absent_families().items():
        spec = registry._absent[name][0]
        for model_type in spec.model_types:
            names = transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES
            if model_type in transformers.CONFIG_MAPPING and not registry.specs_for_model_type(model_type) \
                    and not getattr(transformers.CONFIG_MAPPING[model_type], "sub_configs", None) \
                    and model_type in names and getattr(transformers, names[model_type]).main_input_name == "input_ids":
                found.append((model_type, reason))  # text models (the test feeds token ids)
    return found


@pytest.mark.parametrize("absent_type, reason", _absent_with_a_config())  # not `model_type`: conftest skips those
def test_a_model_of_an_absent_family_stays_stock_with_the_reason(absent_type, reason, tmp_path):
    import torch
    import transformers

    config = transformers.CONFIG_MAPPING[absent_type](
        vocab_size=100, hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
        pad_token_id=0, head_dim=32)  # head_dim: hidden / heads (Ministral's config has no default)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path)
    stock = transformers.AutoModel.from_pretrained(tmp_path)
    with bt_plugin.enabled():
        loaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert not bt_plugin.is_converted(loaded)
    assert reason in bt_plugin.explain(loaded).reason
    with pytest.raises(ValueError, match="not served here"):
        bt_plugin.convert(transformers.AutoModel.from_config(config))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)
