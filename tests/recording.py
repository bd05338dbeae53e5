"""Test helpers that run inside worker processes (importable there: spawned workers get the
parent's `sys.path`, a subprocess gets this folder on PYTHONPATH). Each worker records what its
own model did, so a test can prove the workers ran fused, not only that their outputs match.

bt_plugin is imported only when a record is written, after the worker's model was loaded, so the
zero-code path (`BT_PLUGIN=1`, no import) is what converts it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sentence_transformers import SentenceTransformer

RECORDS_ENV = "BT_PLUGIN_TEST_RECORDS"
RENDEZVOUS_S = 120.0


def layer_calls(model) -> list[tuple[int, int]] | None:
    """(fused, fallback) calls per encoder layer, or None for a stock model."""
    import bt_plugin

    if not bt_plugin.is_converted(model):
        return None
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def rendezvous(directory: Path, workers: int) -> None:
    """Wait (at most RENDEZVOUS_S) until `workers` processes have reached this point, so that every
    worker takes part in the job (a fast starter would otherwise take every chunk)."""
    (directory / f"{os.getpid()}.ready").touch()
    deadline = time.monotonic() + RENDEZVOUS_S
    while len(list(directory.glob("*.ready"))) < workers and time.monotonic() < deadline:
        time.sleep(0.05)


def record(directory: Path, model, before: list[tuple[int, int]] | None, rows: int) -> dict:
    """Append this process's record of one call: its pid, whether `model` is converted, and the
    fused and fallback layer calls the call made; returns the record."""
    after = layer_calls(model)
    entry = {"pid": os.getpid(), "converted": after is not None, "rows": rows,
             "fused": sum(a[0] - b[0] for a, b in zip(after, before)) if after else 0,
             "fallback": sum(a[1] - b[1] for a, b in zip(after, before)) if after else 0}
    with open(directory / f"{os.getpid()}.jsonl", "a") as out:
        out.write(json.dumps(entry) + "\n")
    return entry


def recorded(directory: Path, model, rows: int, call):
    """`call()`, recorded: the first call in this process waits for the other worker
    (`rendezvous`), then the layer calls `call()` made on `model` are appended (`record`)."""
    if not (directory / f"{os.getpid()}.ready").exists():
        rendezvous(directory, 2)
    before = layer_calls(model)
    output = call()
    record(directory, model, before, rows)
    return output


def assert_workers_ran_fused(records: list[dict], rows: int) -> None:
    """Two worker processes took part; every call ran on a converted model, fused, never falling
    back, and together they covered all `rows`."""
    assert len({r["pid"] for r in records}) == 2, records
    assert sum(r["rows"] for r in records) == rows, records
    assert all(r["converted"] and r["fused"] > 0 and r["fallback"] == 0 for r in records), records


def read_records(directory: Path) -> list[dict]:
    """Every record every process wrote into `directory`."""
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]


class RecordedSentenceTransformer(SentenceTransformer):
    """A SentenceTransformer whose multi-process workers record each chunk they encode (into the
    folder named by RECORDS_ENV, 2 workers expected)."""

    def _inference(self, inputs, **kwargs):
        return recorded(Path(os.environ[RECORDS_ENV]), self[0].auto_model, len(inputs),
                        lambda: super(RecordedSentenceTransformer, self)._inference(inputs, **kwargs))


def load_and_report(model_dir: str, queue) -> None:
    """A spawned process's target: load the model itself and report whether it came back converted."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    import bt_plugin

    queue.put(bt_plugin.is_converted(model))
