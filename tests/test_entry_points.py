"""Where architecture specs come from: the built-in families from the running copy's own
`bt_plugin.patches` (whatever is installed, even a checkout shadowing another copy), third-party
families from the entry-point group `bt_plugin.patches`, broken third-party entry points skipped."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
import warnings

import importlib_metadata
import pytest
import torch
from transformers import BertConfig, BertModel

import bt_plugin
from bt_plugin.loading import registry
from bt_plugin.patches import bert as bert_patch
from bt_plugin.spec import EncoderSpec

import support


class MyBertConfig(BertConfig):
    """A third-party model type that no built-in spec serves."""

    model_type = "my-bert"


THIRDPARTY_MODULE = '''
"""A third-party bt_plugin architecture package."""
from bt_plugin.spec import EncoderSpec, config_flags_false

SPEC = EncoderSpec(
    name="thirdparty",
    model_types=("my-bert",),
    layer_classes=("transformers.models.bert.modeling_bert.BertLayer",),
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    out_proj="attention.output.dense",
    norm1="attention.output.LayerNorm",
    linear1="intermediate.dense",
    activation="intermediate.intermediate_act_fn",
    linear2="output.dense",
    norm2="output.LayerNorm",
    num_heads="attention.self.num_attention_heads",
    config_checks=(config_flags_false("is_decoder", "add_cross_attention"),),
)
'''


def write_distribution(root, dist_name: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """An installed distribution in `root`: top-level modules plus a dist-info with entry points."""
    for module, source in modules.items():
        package = root / module
        package.mkdir()
        (package / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{dist_name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")
    (info / "RECORD").write_text("")


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    """A directory put on sys.path for the test; afterwards removed and the registry re-read."""
    root = tmp_path / "site"
    root.mkdir()
    before = set(sys.modules)
    yield root, monkeypatch
    monkeypatch.undo()
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", None) and str(root) in str(sys.modules[name].__file__):
            del sys.modules[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the restored registry reads cleanly
        specs = registry.reload()
    assert "bert" in specs and "thirdparty" not in specs


def bert_config_values() -> dict:
    values = support.make_config("bert").to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    return values


def assert_bert_still_converts():
    torch.manual_seed(0)
    model = BertModel(support.make_config("bert")).eval()
    stock = copy.deepcopy(model)
    bt_plugin.convert(model)
    assert bt_plugin.is_converted(model)
    assert bt_plugin.explain(model).family == "bert"
    assert_same_outputs(model, stock)


def assert_same_outputs(model, stock):
    ids, mask = support.padded_batch([9, 4, 12, 1], length=12, pad_token=0)
    with torch.inference_mode():
        fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
    assert support.max_diff_on_real(fused, expected, mask) < 1e-4
    report = bt_plugin.explain(model)
    assert report.layers and all(layer.fused_calls >= 1 and layer.fallback_calls == 0 for layer in report.layers)


# --------------------------------------------------------------------------------------------------


def test_builtin_families_come_from_the_package_not_from_metadata():
    from bt_plugin.patches import BUILTIN_FAMILIES

    assert "bert" in BUILTIN_FAMILIES
    found = importlib_metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    assert not [ep for ep in found if ep.value.startswith("bt_plugin.patches.")]  # none declared
    specs = registry.reload()
    assert specs["bert"] is bert_patch.SPEC
    assert registry.all_specs() is specs  # read once, then cached
    assert registry.spec_for_model_type("roberta") is bert_patch.SPEC
    assert set(bert_patch.SPEC.model_types) <= set(registry.supported_model_types())


def test_builtins_do_not_depend_on_entry_points(monkeypatch):
    """With the entry-point group empty every built-in family is still there."""
    before = registry.supported_model_types()
    monkeypatch.setattr(importlib_metadata, "entry_points", lambda **kwargs: [])
    try:
        assert registry.reload().keys() == {spec.name for spec in registry.builtin_specs()}
        assert registry.supported_model_types() == before
        model = BertModel(support.make_config("bert")).eval()
        assert bt_plugin.is_converted(bt_plugin.convert(model))
    finally:
        monkeypatch.undo()
        registry.reload()


def test_stale_metadata_naming_builtin_modules_is_ignored(site_dir):
    """An installed copy of another release declares built-ins as entry points (one that this
    copy no longer has): the running copy's own list wins, without a warning."""
    root, monkeypatch = site_dir
    write_distribution(root, "old_bt_plugin", {}, {"bert": "bt_plugin.patches.bert:SPEC",
                                                   "gone": "bt_plugin.patches.gone:SPECS"})
    monkeypatch.syspath_prepend(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = registry.reload()
    assert specs["bert"] is bert_patch.SPEC


SHADOW_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("error")
import bt_plugin, bt_plugin.patches
from bt_plugin.loading import registry
print(json.dumps({"file": bt_plugin.__file__, "patches": bt_plugin.patches.__file__,
                  "model_types": registry.supported_model_types()}))
"""


def test_a_checkout_shadowing_another_installed_copy_finds_every_builtin(tmp_path):
    """`python -c` (or `-m`, a script, a notebook) started in a clone's root imports the clone's
    `bt_plugin/`, where `bt_plugin.patches` is the top-level `patches/` folder, while a different
    copy (older metadata, its own bt_plugin/patches) is installed."""
    repo = Path(__file__).resolve().parent.parent
    checkout = tmp_path / "clone"
    for folder in ("bt_plugin", "patches"):
        shutil.copytree(repo / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    installed = tmp_path / "site"
    (installed / "bt_plugin" / "patches").mkdir(parents=True)
    (installed / "bt_plugin" / "__init__.py").write_text("raise ImportError('the installed copy was imported')\n")
    (installed / "bt_plugin" / "patches" / "__init__.py").write_text("BUILTIN_FAMILIES = ()\n")
    write_distribution(installed, "bt_plugin", {}, {"bert": "bt_plugin.patches.bert:SPEC",
                                                    "gone": "bt_plugin.patches.gone:SPECS"})
    env = dict(os.environ, PYTHONPATH=str(installed))
    env.pop("BT_PLUGIN", None)
    out = subprocess.run([sys.executable, "-c", SHADOW_SCRIPT], cwd=checkout, env=env,
                         capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert Path(found["file"]).parent == checkout / "bt_plugin"
    assert Path(found["patches"]).parent == checkout / "patches"
    assert found["model_types"] == registry.supported_model_types()
    assert out.stderr == ""


def test_third_party_distribution_adds_an_architecture(site_dir):
    root, monkeypatch = site_dir
    torch.manual_seed(0)
    config = MyBertConfig(**bert_config_values())
    assert config.model_type == "my-bert"
    model = BertModel(config).eval()
    stock = copy.deepcopy(model)

    # before the distribution is installed, nothing serves "my-bert"
    with pytest.raises(ValueError, match="'my-bert' is not supported"):
        bt_plugin.convert(model)

    write_distribution(root, "thirdparty_bt", {"thirdparty_bt": THIRDPARTY_MODULE},
                       {"thirdparty": "thirdparty_bt:SPEC"})
    monkeypatch.syspath_prepend(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = registry.reload()

    assert {"bert", "thirdparty"} <= set(specs)
    spec = specs["thirdparty"]
    assert isinstance(spec, EncoderSpec)
    assert type(spec).__module__ == "bt_plugin.spec"
    assert sys.modules["thirdparty_bt"].SPEC is spec
    assert registry.spec_for_model_type("my-bert") is spec
    assert "my-bert" in registry.supported_model_types()
    names = {ep.name for ep in importlib_metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert "thirdparty" in names

    bt_plugin.convert(model)
    assert bt_plugin.is_converted(model)
    assert model.__dict__["_bt_plugin"]["spec"] == "thirdparty"
    assert bt_plugin.explain(model).family == "thirdparty"
    assert_same_outputs(model, stock)
    # the built-in spec is unaffected
    assert_bert_still_converts()


def test_third_party_entry_point_may_give_a_list(site_dir):
    root, monkeypatch = site_dir
    source = THIRDPARTY_MODULE + textwrap.dedent(
        """
        import dataclasses
        SPECS = [SPEC, dataclasses.replace(SPEC, name="thirdparty2", model_types=("my-bert-2",))]
        """
    )
    write_distribution(root, "thirdparty_list_bt", {"thirdparty_list_bt": source},
                       {"thirdparty": "thirdparty_list_bt:SPECS"})
    monkeypatch.syspath_prepend(str(root))
    specs = registry.reload()
    assert {"bert", "thirdparty", "thirdparty2"} <= set(specs)
    assert registry.spec_for_model_type("my-bert-2").name == "thirdparty2"
    registry_after = set(specs)
    monkeypatch.undo()
    assert "thirdparty2" not in registry.reload()
    assert "thirdparty2" in registry_after


BROKEN = {
    "import_error": ("broken_import_bt", {"broken_import_bt": "raise ImportError('no such backend')\n"},
                     "broken_import_bt:SPEC", "ImportError"),
    "not_a_spec": ("not_a_spec_bt", {"not_a_spec_bt": "SPEC = {'name': 'dict, not an EncoderSpec'}\n"},
                   "not_a_spec_bt:SPEC", "TypeError"),
    "missing_attribute": ("missing_attr_bt", {"missing_attr_bt": "OTHER = 1\n"},
                          "missing_attr_bt:SPEC", "AttributeError"),
    "list_with_junk": ("junk_list_bt", {"junk_list_bt": THIRDPARTY_MODULE + "\nSPECS = [SPEC, 42]\n"},
                       "junk_list_bt:SPECS", "TypeError"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_third_party_entry_point_is_skipped_with_one_warning(site_dir, case):
    root, monkeypatch = site_dir
    dist_name, modules, value, error_name = BROKEN[case]
    entry_name = f"broken_{case}"
    write_distribution(root, dist_name, modules, {entry_name: value})
    monkeypatch.syspath_prepend(str(root))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = registry.reload()
        registry.all_specs()  # cached: no second warning
        registry.supported_model_types()

    relevant = [w for w in caught if "bt_plugin" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    warning = relevant[0]
    assert issubclass(warning.category, RuntimeWarning)
    message = str(warning.message)
    assert repr(entry_name) in message
    assert value in message
    assert error_name in message
    assert entry_name not in specs and "thirdparty" not in specs
    assert specs["bert"] is bert_patch.SPEC
    assert_bert_still_converts()
