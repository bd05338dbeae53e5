"""Peak memory of one forward, each candidate in a fresh process."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bt_plugin.tools.bench.cases import Case, text_cases
from bt_plugin.tools.bench.models import forward, load_candidate, model_source, unavailable_reason
from bt_plugin.tools.bench.results import MemoryResult
from bt_plugin.tools.bench.settings import MEMORY_CANDIDATES, SHAPES, Settings


# Linux carries the peak RSS of the process that spawns a child into the child's ru_maxrss, so a
# child started by this (large) process would report our peak. A small intermediate Python
# process spawns the measuring child instead.
_SPAWN_SHIM = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


_CHILD = "import sys; from bt_plugin.tools.bench.memory import memory_child; sys.exit(memory_child(sys.argv[1:]))"


def _maxrss_kib() -> int:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _rss_kib() -> int | None:
    """This process's resident set size now (Linux), to show a baseline peak was not masking."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def memory_child(argv: list[str]) -> int:
    """In a fresh process: load, build the inputs, warm up on 8 tokens, then measure one forward.

    Every weight is read before measuring (safetensors weights are mapped lazily), so the number
    is the forward's own working memory. Prints one JSON line.
    """
    source, candidate, inputs, threads = argv
    if int(threads):
        torch.set_num_threads(int(threads))
    model = load_candidate(source, candidate)
    batch = torch.load(inputs)
    with torch.inference_mode():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
        model(**{k: v[:1, :8] for k, v in batch.items()})
    gc.collect()
    before, rss = _maxrss_kib(), _rss_kib()
    forward(model, batch)
    after = _maxrss_kib()
    print(json.dumps({"maxrss_before_kib": before, "maxrss_after_kib": after, "rss_before_kib": rss}))
    return 0


def measure_memory(source: str, candidate: str, inputs: Path, threads: int,
                   result: MemoryResult) -> MemoryResult:
    """Run `memory_child` through the spawn shim and fill in `result`."""
    command = [sys.executable, "-c", _SPAWN_SHIM, sys.executable, "-c", _CHILD, source, candidate, str(inputs),
               str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        result.error = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return result
    values = json.loads(done.stdout.strip().splitlines()[-1])
    result.__dict__.update(values)
    result.peak_increase_mib = (values["maxrss_after_kib"] - values["maxrss_before_kib"]) / 1024
    return result


def memory_jobs(settings: Settings, by_shape: dict[str, list[Case]], tokenizer,
                workdir: Path) -> list[tuple[str, Case]]:
    """(checkpoint, text case) for each selected shape whose memory is measured (the bert shapes),
    whether or not its text workload was timed."""
    if not settings.memory or (settings.workloads and "text" not in settings.workloads):
        return []
    jobs = []
    for shape in settings.shapes:
        if SHAPES[shape].memory:
            timed = [c for c in by_shape.get(shape, []) if c.workload == "text"]
            case = (timed or text_cases(shape, settings.text_batches, tokenizer, settings.seed))[0]
            jobs.append((model_source(shape, workdir, settings.seed), case))
    return jobs


def run_memory(jobs: list[tuple[str, Case]], settings: Settings, workdir: Path) -> list[MemoryResult]:
    """Peak RSS of one forward of the longest batch of each case, per candidate, in parallel processes."""
    tasks = []
    for source, case in jobs:
        batch = max(case.batches, key=lambda b: b["input_ids"].shape[1])
        inputs = workdir / f"{case.shape}-{case.workload}-inputs.pt"
        torch.save(batch, inputs)
        shape = "x".join(map(str, batch["input_ids"].shape))
        for name in settings.candidates:
            if name in MEMORY_CANDIDATES and not unavailable_reason(name):
                result = MemoryResult(case.shape, case.workload, name, shape)
                tasks.append((source, name, inputs, settings.threads or 0, result))
    with ThreadPoolExecutor(max_workers=len(MEMORY_CANDIDATES)) as pool:  # not timed: overlap them
        return list(pool.map(lambda task: measure_memory(*task), tasks))
