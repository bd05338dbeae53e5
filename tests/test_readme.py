"""The README's Python examples run, in order, in one namespace (as a reader would paste them)."""

import re
from pathlib import Path

import bt_plugin

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 4


def test_readme_examples_run(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    try:
        for block in python_blocks():
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        bt_plugin.disable()
    assert bt_plugin.is_converted(namespace["model"]) is False  # the last example reverts
