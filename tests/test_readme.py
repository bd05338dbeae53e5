"""The README's Python examples run, in order, in one namespace (as a reader would paste them);
the Ray examples run in tests/test_ray_data.py."""

from pathlib import Path

import bt_plugin
from support import README, readme_python_blocks as python_blocks


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


def test_readme_states_exactly_the_versions_ci_tests():
    """The versions section names every tested transformers release, the newest as such, the one
    torch, and the declared ranges (CI's matrix reads the same tuple: .ci/matrix.py)."""
    import subprocess
    import sys

    from bt_plugin import compat

    text = README.read_text()
    section = text[text.index("## Versions"):text.index("## Integrations")]
    *pinned, newest = compat.TESTED_TRANSFORMERS
    assert ", ".join(pinned) in section
    assert f"the newest release ({newest} when this was written)" in section
    assert all(f"torch {version}" in section for version in compat.TESTED_TORCH)
    for package, spec in compat.SUPPORTED_VERSIONS.items():
        assert f"{package}{spec}" in section
    ci = Path(__file__).resolve().parent.parent / ".ci" / "matrix.py"
    listed = subprocess.run([sys.executable, str(ci), "versions"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == pinned
