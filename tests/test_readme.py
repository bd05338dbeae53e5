"""The Python examples of the README and of the documentation pages run: the README's and the pages
that follow it (support.EXECUTED_IN_ORDER) in order, in one namespace, as a reader would paste them;
every other page's on its own (support.EXECUTED_ALONE); the Ray examples in tests/test_ray_data.py."""

from pathlib import Path

import bt_plugin
import pytest

from support import (EXECUTED_ALONE, EXECUTED_IN_ORDER, ROOT, python_blocks as page_blocks,
                     readme_python_blocks as python_blocks, uses_ray)


def test_readme_has_examples():
    assert len(python_blocks()) >= 4


def run_in_one_namespace(blocks: list[tuple[Path, str]]) -> dict:
    """Run `(page, block)` pairs in order in one namespace, as a reader pasting them would; the
    plugin is disabled afterwards whatever happened."""
    namespace: dict = {}
    try:
        for page, block in blocks:
            exec(compile(block, str(page), "exec"), namespace)
    finally:
        bt_plugin.disable()
    return namespace


def test_readme_examples_run(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = run_in_one_namespace(python_blocks())
    assert bt_plugin.is_converted(namespace["model"]) is False  # the last example reverts


@pytest.mark.parametrize("page", EXECUTED_ALONE, ids=lambda page: page.name)
def test_page_examples_run(page, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = page_blocks(page)
    assert blocks
    run_in_one_namespace([(page, block) for block in blocks])


def test_every_page_with_python_examples_runs_them():
    """A new page's examples cannot go unexecuted: each page with a ```python block is listed."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    with_blocks = {page for page in pages if page_blocks(page)}
    assert with_blocks == set(EXECUTED_IN_ORDER) | set(EXECUTED_ALONE)
    assert all(not uses_ray(block) for page in EXECUTED_ALONE for block in page_blocks(page))


def test_readme_states_exactly_the_versions_ci_tests():
    """The versions section names every tested transformers release, the newest as such, the one
    torch, and the declared ranges (CI's matrix reads the same tuple: .ci/matrix.py)."""
    import subprocess
    import sys

    from bt_plugin import compat

    section = (ROOT / "docs" / "versions.md").read_text()
    *pinned, newest = compat.TESTED_TRANSFORMERS
    assert ", ".join(pinned) in section
    assert f"the newest release ({newest} when this was written)" in section
    assert all(f"torch {version}" in section for version in compat.TESTED_TORCH)
    for package, spec in compat.SUPPORTED_VERSIONS.items():
        assert f"{package}{spec}" in section
    ci = ROOT / ".ci" / "matrix.py"
    listed = subprocess.run([sys.executable, str(ci), "versions"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == pinned


def test_api_reference_lists_every_export():
    """docs/api.md renders (mkdocstrings, `mkdocs build --strict` in CI) every public name of bt_plugin."""
    api = (ROOT / "docs" / "api.md").read_text()
    assert {line[len("::: bt_plugin."):].strip() for line in api.splitlines() if line.startswith("::: bt_plugin.")} == set(bt_plugin.__all__)
