"""The transformers and torch version matrices CI runs, read from bt_plugin/compat.py without importing it.

`python3 .ci/matrix.py versions`: the pinned releases of TESTED_TRANSFORMERS that CI tests on the first
torch of TESTED_TORCH: all but the newest (the README's test command installs the newest and runs the
whole suite there) and those a torch row tests with its own torch (`python3 .ci/matrix.py elsewhere`
says which), so that each release runs the matrix tests once.
`python3 .ci/matrix.py tests`: the test modules run on each of them: the core behaviour (enable,
enabled, disable, zero code, lifecycle, training, the Trainer, save/load, fallback reasons, explain), parity
for every registered family present in that version, and the property tests over every family (masks of
every kind: 4.x hands layers other mask formats).
`python3 .ci/matrix.py torch`: the rows of TESTED_TORCH other than the first (the README's torch, which
the whole suite and the transformers matrix run on), one `TORCH PYTHON TRANSFORMERS` line each: CI runs
the same test modules in a fresh venv of that Python with that torch and that transformers.
"""

import ast
import pathlib
import sys

MATRIX_TESTS = [
    "tests/test_activation.py", "tests/test_zero_code.py", "tests/test_lifecycle.py", "tests/test_parity.py",
    "tests/test_fallbacks.py", "tests/test_versions_and_races.py", "tests/test_structure_guard.py",
    "tests/test_layer_tensors.py", "tests/test_padded_reads.py",
    "tests/test_arch_text.py", "tests/test_arch_vision.py", "tests/test_arch_audio.py",
    "tests/test_arch_seq2seq.py", "tests/test_arch_fsmt.py", "tests/test_arch_relative.py",
    "tests/test_arch_rotary.py", "tests/test_trainer.py",
    "tests/test_fuzz_families.py", "tests/test_mask_edge_cases.py", "tests/test_autocast.py", "tests/test_precision.py",
    "tests/test_prepacked.py", "tests/test_private_ops.py", "tests/test_packed.py",
    "tests/test_arch_decoder.py",
]


def compat_value(name: str):
    """The literal value of a module-level assignment in bt_plugin/compat.py."""
    source = (pathlib.Path(__file__).parent.parent / "bt_plugin" / "compat.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{name} not found in bt_plugin/compat.py")


def tested_transformers() -> list[str]:
    return list(compat_value("TESTED_TRANSFORMERS"))


def tested_torch() -> list[tuple[str, str, str]]:
    """TESTED_TORCH's (torch, Python, transformers) rows; each row's transformers is a tested one."""
    rows = [tuple(row) for row in compat_value("TESTED_TORCH")]
    bad = [row for row in rows if len(row) != 3 or row[2] not in tested_transformers()]
    if bad:
        raise SystemExit(f"TESTED_TORCH rows must be (torch, python, transformers of TESTED_TRANSFORMERS): {bad}")
    return rows


def on_other_torch() -> dict[str, str]:
    """`{transformers: torch}`: the pinned releases a torch row other than the first runs."""
    pinned = tested_transformers()[:-1]
    return {row[2]: row[0] for row in tested_torch()[1:] if row[2] in pinned}


def on_first_torch() -> list[str]:
    """The pinned releases the transformers matrix runs on the first torch (see `versions`)."""
    return [version for version in tested_transformers()[:-1] if version not in on_other_torch()]


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "versions"
    if what == "versions":
        print(" ".join(on_first_torch()))
    elif what == "elsewhere":
        print("; ".join(f"transformers {version} runs them on torch {torch}" for version, torch in on_other_torch().items()))
    elif what == "newest":
        print(tested_transformers()[-1])
    elif what == "tests":
        print(" ".join(MATRIX_TESTS))
    elif what == "torch":
        print("\n".join(" ".join(row) for row in tested_torch()[1:]))
    else:
        raise SystemExit(f"unknown {what!r}: versions, elsewhere, newest, tests or torch")
