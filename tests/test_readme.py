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
    """The versions page names every tested transformers release, the newest as such, one row per tested
    torch with its Python and transformers, and the declared ranges; CI's matrices read the same tuples
    (.ci/matrix.py)."""
    import subprocess
    import sys

    from bt_plugin import compat

    section = (ROOT / "docs" / "versions.md").read_text()
    *pinned, newest = compat.TESTED_TRANSFORMERS
    elsewhere = {transformers: torch for torch, _, transformers in compat.TESTED_TORCH[1:]}
    on_first_torch = [version for version in pinned if version not in elsewhere]
    assert f"{', '.join(on_first_torch)} on torch {compat.TESTED_TORCH[0][0]}" in section
    # a release the transformers matrix leaves to a torch row is named with that row's torch
    assert all(f"{version} on torch {elsewhere[version]}" in section for version in pinned if version in elsewhere)
    assert f"the newest release ({newest} when this was written)" in section
    assert f"**torch {compat.TESTED_TORCH[0][0]}**" in section  # the transformers matrix's torch
    assert _torch_table(section) == {torch: (python, transformers) for torch, python, transformers in compat.TESTED_TORCH}
    for package, spec in compat.SUPPORTED_VERSIONS.items():
        assert f"{package}{spec}" in section
    ci = ROOT / ".ci" / "matrix.py"
    listed = subprocess.run([sys.executable, str(ci), "versions"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == on_first_torch
    rows = subprocess.run([sys.executable, str(ci), "torch"], capture_output=True, text=True, check=True)
    assert [tuple(line.split()) for line in rows.stdout.splitlines()] == list(compat.TESTED_TORCH[1:])


def _torch_table(page: str) -> dict[str, tuple[str, str]]:
    """`{torch: (Python, transformers)}` from the page's table headed `| torch | Python | transformers |`;
    a row naming a range of transformers (`4.48.3 … 5.25.0`) stands for its newest."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| torch | Python | transformers |"))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        torch, python, transformers = (cell.strip() for cell in line.strip("|").split("|")[:3])
        table[torch.split()[0]] = (python, transformers.split()[-1])
    return table


def test_readme_lists_every_tested_torch_and_python():
    """The README's tested-versions line names each torch and Python CI tests, the declared torch range
    and the oldest and newest tested transformers; its commands install the torch the suite runs on."""
    from bt_plugin import compat

    readme = (ROOT / "README.md").read_text()
    line = " ".join(readme.split("Tested versions:", 1)[1].split("\n\n", 1)[0].split())
    for torch, python, _ in compat.TESTED_TORCH:
        assert f"{torch}," in line or f"{torch} " in line, torch
        assert f"{python}," in line or f"{python} " in line, python
    assert f"`torch{compat.SUPPORTED_VERSIONS['torch']}`" in line
    assert f"transformers {compat.TESTED_TRANSFORMERS[0]} to {compat.TESTED_TRANSFORMERS[-1]}" in line
    assert f"pip install torch=={compat.TESTED_TORCH[0][0]} && pip install -e" in readme


def test_api_reference_lists_every_export():
    """docs/api.md renders (mkdocstrings, `mkdocs build --strict` in CI) every public name of bt_plugin."""
    api = (ROOT / "docs" / "api.md").read_text()
    assert {line[len("::: bt_plugin."):].strip() for line in api.splitlines() if line.startswith("::: bt_plugin.")} == set(bt_plugin.__all__)
