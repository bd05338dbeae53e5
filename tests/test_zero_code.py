"""Zero code: the `bt_plugin.pth` start-up hook and `BT_PLUGIN`, in fresh interpreters.

Interpreters that import transformers are slow (seconds each), so the few that do are started
together, once per module, and each test reads the report of its own one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import support
from bt_plugin import _boot

REPO = Path(__file__).resolve().parents[1]
PTH_FILE = REPO / "bt_plugin.pth"
TIMEOUT = 240


def make_env(flag: str | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("BT_PLUGIN", "BT_PLUGIN_KERNEL", "PYTHONWARNINGS", "PYTHONSTARTUP"):
        env.pop(name, None)
    if flag is not None:
        env["BT_PLUGIN"] = flag
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


# Shared by the scripts: where the plugin stands in this interpreter, without importing bt_plugin.
PROBE = textwrap.dedent(
    """
    import json, sys

    def probe():
        modules = sorted(m for m in sys.modules if m == "bt_plugin" or m.startswith("bt_plugin.") or m == "wrapt")
        finders = sum(1 for f in sys.meta_path if getattr(f, "_bt_plugin_finder", False))
        state = {"modules": modules, "finders": finders, "torch": "torch" in sys.modules}
        mu = sys.modules.get("transformers.modeling_utils")
        if mu is not None:
            entries = {}
            for name in ("from_pretrained", "_from_config"):
                entry = mu.PreTrainedModel.__dict__[name]
                depth = 0
                while hasattr(entry, "__wrapped__") and type(entry) is not classmethod:
                    entry, depth = entry.__wrapped__, depth + 1
                entries[name] = {"wrappers": depth, "inner": type(entry).__name__}
            state["entries"] = entries
        return state

    def report(**values):
        print("REPORT " + json.dumps(values))
    """
)


def start(script: str, env: dict[str, str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE + textwrap.dedent(script)],
        env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class Run:
    """A started interpreter; `.result()` waits and gives (report dict, stderr)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self._done = None

    def result(self):
        if self._done is None:
            try:
                out, err = self.process.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, err = self.process.communicate()
            assert self.process.returncode == 0, f"rc={self.process.returncode}\n{out}\n{err}"
            lines = [line for line in out.splitlines() if line.startswith("REPORT ")]
            assert len(lines) == 1, out + err
            self._done = (json.loads(lines[0][len("REPORT "):]), err)
        return self._done


ZERO_CODE_LOAD = """
    before = probe()
    from transformers import AutoModel
    m = AutoModel.from_pretrained(MODEL_DIR)
    after = probe()
    layer = type(m.encoder.layer[0])
    import bt_plugin
    report(before=before, after=after, layer=layer.__name__, stock_base=layer.__bases__[-1].__name__,
           converted=bt_plugin.is_converted(m), info=m.__dict__.get("_bt_plugin"))
"""

EXPLICIT_IMPORT = """
    before = probe()
    import transformers
    after_transformers = probe()
    import transformers.modeling_utils
    after_modeling_utils = probe()
    from bt_plugin import _boot
    _boot.main()
    _boot.main()
    again = probe()
    report(before=before, after_transformers=after_transformers,
           after_modeling_utils=after_modeling_utils, again=again)
"""

STOCK_THEN_LATE_MAIN = """
    import os
    import transformers
    after_transformers = probe()
    import transformers.modeling_utils
    after_modeling_utils = probe()
    from transformers import AutoModel
    stock = AutoModel.from_pretrained(MODEL_DIR)
    stock_layer = type(stock.encoder.layer[0]).__name__
    after_load = probe()
    os.environ["BT_PLUGIN"] = "1"
    from bt_plugin import _boot
    _boot.main()
    late = probe()
    _boot.main()
    late_again = probe()
    import bt_plugin
    converted = bt_plugin.is_converted(AutoModel.from_pretrained(MODEL_DIR))
    report(after_transformers=after_transformers, after_modeling_utils=after_modeling_utils,
           after_load=after_load, stock_layer=stock_layer, late=late, late_again=late_again,
           converted=converted)
"""

PLUGIN_OFF = """
    at_start = probe()
    import transformers
    after_transformers = probe()
    import transformers.modeling_utils
    after_modeling_utils = probe()
    report(at_start=at_start, after_transformers=after_transformers,
           after_modeling_utils=after_modeling_utils)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The interpreters that import transformers, started in parallel."""
    model_dir = support.save_model("bert", tmp_path_factory.mktemp("zero_code_bert"))
    cwd = tmp_path_factory.mktemp("cwd")
    with_dir = lambda script: f"MODEL_DIR = {model_dir!r}\n" + textwrap.dedent(script)  # noqa: E731
    started = {
        "zero_code": Run(start(with_dir(ZERO_CODE_LOAD), make_env("1"), cwd)),
        "explicit": Run(start(with_dir(EXPLICIT_IMPORT), make_env("1"), cwd)),
        "unset": Run(start(with_dir(STOCK_THEN_LATE_MAIN), make_env(None), cwd)),
        "zero": Run(start(with_dir(PLUGIN_OFF), make_env("0"), cwd)),
    }
    yield started
    for run in started.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.communicate()


def run_quick(script: str, flag: str | None, cwd, **extra: str):
    """An interpreter that does not import transformers (cheap)."""
    run = Run(start(script, make_env(flag, **extra), cwd))
    return run.result()


def _no_plugin_modules(state):
    return state["modules"] == []


# --------------------------------------------------------------------------------------------------
# BT_PLUGIN=1


def test_bt_plugin_1_converts_a_plain_transformers_script(runs):
    report, _ = runs["zero_code"].result()
    assert report["converted"] is True
    assert report["layer"] != "BertLayer"  # the fused subclass of BertLayer
    assert report["stock_base"] == "BertLayer"
    assert report["info"]["spec"] == "bert"
    # the hook was lazy: nothing heavy before transformers was imported
    assert "wrapt" not in report["before"]["modules"]
    assert report["before"]["torch"] is False
    assert report["before"]["finders"] == 1
    # and it was installed exactly once, the one-shot finder gone
    assert report["after"]["finders"] == 0
    for entry in report["after"]["entries"].values():
        assert entry == {"wrappers": 1, "inner": "classmethod"}


def test_bt_plugin_1_is_lazy_until_modeling_utils(runs):
    report, _ = runs["explicit"].result()
    before = report["before"]
    assert "wrapt" not in before["modules"]
    assert before["finders"] == 1
    assert "entries" not in before
    # after `import transformers.modeling_utils` the wrappers are installed, once
    after = report["after_modeling_utils"]
    assert "wrapt" in after["modules"]
    assert after["finders"] == 0
    for entry in after["entries"].values():
        assert entry == {"wrappers": 1, "inner": "classmethod"}
    # main() run again (as by a second .pth pass) changes nothing
    assert report["again"]["finders"] == 0
    assert report["again"]["entries"] == after["entries"]


def test_no_flag_imports_nothing_then_late_main_patches_at_once(runs):
    report, _ = runs["unset"].result()
    for key in ("after_transformers", "after_modeling_utils", "after_load"):
        assert _no_plugin_modules(report[key]), (key, report[key])
        assert report[key]["finders"] == 0
    assert report["after_modeling_utils"]["entries"]["from_pretrained"] == {"wrappers": 0, "inner": "classmethod"}
    assert report["stock_layer"] == "BertLayer"
    # BT_PLUGIN=1 set and main() run after transformers.modeling_utils is imported: patched at once
    late = report["late"]
    assert late["finders"] == 0
    for entry in late["entries"].values():
        assert entry == {"wrappers": 1, "inner": "classmethod"}
    assert report["late_again"]["entries"] == late["entries"]
    assert report["converted"] is True


def test_bt_plugin_0_imports_nothing(runs):
    report, _ = runs["zero"].result()
    # the plugin is off ...
    for key in ("at_start", "after_transformers", "after_modeling_utils"):
        assert report[key]["finders"] == 0, key
        assert "wrapt" not in report[key]["modules"], key
    for entry in report["after_modeling_utils"]["entries"].values():
        assert entry == {"wrappers": 0, "inner": "classmethod"}
    # ... and, as without the flag, nothing of bt_plugin was imported for it
    for key in ("at_start", "after_transformers", "after_modeling_utils"):
        assert _no_plugin_modules(report[key]), (key, report[key]["modules"])


# --------------------------------------------------------------------------------------------------
# flag values


PARSE_TABLE = [
    ("1", True), ("true", True), ("TRUE", True), ("True", True), ("yes", True), ("YES", True),
    ("on", True), ("On", True), (" 1 ", True), ("\ttrue\n", True),
    (None, False), ("", False), (" ", False), ("0", False), ("false", False), ("False", False),
    ("no", False), ("NO", False), ("off", False), ("OFF", False), (" off ", False),
    ("maybe", None), ("2", None), ("enable", None), ("y", None), ("n", None), ("1.0", None),
    ("-1", None), ("truee", None),
]


@pytest.mark.parametrize(("value", "expected"), PARSE_TABLE)
def test_parse_flag_table(value, expected):
    assert _boot.parse_flag(value) is expected


def test_flag_enabled_warns_once_on_malformed_value():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _boot.flag_enabled({"BT_PLUGIN": "maybe"}) is False
    assert len(caught) == 1
    assert issubclass(caught[0].category, RuntimeWarning)
    message = str(caught[0].message)
    assert "'maybe'" in message
    for value in _boot.TRUE_VALUES + tuple(v for v in _boot.FALSE_VALUES if v):
        assert value in message


@pytest.mark.parametrize("environ", [{}, {"BT_PLUGIN": ""}, {"BT_PLUGIN": "0"}, {"BT_PLUGIN": "1"}, {"BT_PLUGIN": "On"}])
def test_flag_enabled_is_silent_on_accepted_values(environ):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _boot.flag_enabled(environ) is bool(_boot.parse_flag(environ.get("BT_PLUGIN")))
    assert caught == []


START_STATE = """
    from bt_plugin import _boot
    report(state=probe(), started=_boot._started)
"""


def test_flag_values_end_to_end(tmp_path):
    """Cheap interpreters (no transformers): which values make the .pth install the hook."""
    for value in ("true", "YES", "On"):
        report, err = run_quick(START_STATE, value, tmp_path)
        assert report["state"]["finders"] == 1, value
        assert report["started"] is True, value
        assert "wrapt" not in report["state"]["modules"], value
        assert "Warning" not in err, (value, err)
    for value in ("off", "", "0", "no"):
        report, err = run_quick(START_STATE, value, tmp_path)
        assert report["state"]["finders"] == 0, value
        assert report["started"] is False, value
        assert "wrapt" not in report["state"]["modules"], value
        assert "Warning" not in err, (value, err)


def test_malformed_flag_warns_once_and_stays_off(tmp_path):
    report, err = run_quick(START_STATE, "maybe", tmp_path)
    assert report["state"]["finders"] == 0
    assert report["started"] is False
    assert err.count("RuntimeWarning") == 1, err
    assert "BT_PLUGIN='maybe'" in err
    for value in _boot.TRUE_VALUES + tuple(v for v in _boot.FALSE_VALUES if v):
        assert value in err


# --------------------------------------------------------------------------------------------------
# the .pth line


def test_main_twice_installs_one_finder(tmp_path):
    script = """
        from bt_plugin import _boot
        first = probe()          # the .pth already ran main() once
        _boot.main()
        _boot.main()
        report(first=first, again=probe())
    """
    report, _ = run_quick(script, "1", tmp_path)
    assert report["first"]["finders"] == 1
    assert report["again"]["finders"] == 1
    assert "wrapt" not in report["again"]["modules"]


def _pth_lines() -> list[str]:
    lines = [line for line in PTH_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines and all(line.startswith("import ") for line in lines)  # site.py executes these
    return lines


def test_pth_line_swallows_a_broken_import(monkeypatch):
    monkeypatch.setenv("BT_PLUGIN", "1")
    monkeypatch.setitem(sys.modules, "bt_plugin._boot", None)  # `from bt_plugin._boot import main` fails
    meta_path = list(sys.meta_path)
    for line in _pth_lines():
        exec(line, {})  # must not raise
    assert sys.meta_path == meta_path


def test_pth_line_does_nothing_without_flag(monkeypatch):
    monkeypatch.delenv("BT_PLUGIN", raising=False)
    monkeypatch.setitem(sys.modules, "bt_plugin._boot", None)
    for line in _pth_lines():
        exec(line, {})


def test_interpreter_starts_with_a_broken_bt_plugin(tmp_path):
    """A shadowing, broken bt_plugin package must not break interpreter start-up."""
    shadow = tmp_path / "shadow" / "bt_plugin"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "_boot.py").write_text("raise ImportError('broken on purpose')\n")
    report, err = run_quick(
        "report(alive=True, file=__import__('bt_plugin').__file__)", "1", tmp_path,
        PYTHONPATH=str(shadow.parent),
    )
    assert report["alive"] is True
    assert report["file"] == str(shadow / "__init__.py")  # the broken package was the one imported
    assert "Traceback" not in err and "broken on purpose" not in err
