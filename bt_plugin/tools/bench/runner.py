"""A whole run: build the cases, time shape by shape, measure memory."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from bt_plugin.tools.bench.cases import Case, build_cases
from bt_plugin.tools.bench.memory import memory_jobs, run_memory
from bt_plugin.tools.bench.models import minilm_dir, model_source
from bt_plugin.tools.bench.results import BenchResults, CandidateResult
from bt_plugin.tools.bench.settings import SHAPES, Settings, make_settings, shape_candidates
from bt_plugin.tools.bench.timing import run_shape


def machine_info() -> dict:
    """CPU model, cores, torch threads, versions, date and load: what the README line names."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from bt_plugin.precision import native_precisions

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "native_precisions": native_precisions(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": datetime.date.today().isoformat(),
        "load_average_before": _load_average(),
    }


def _load_average() -> float | None:
    """The 1-minute load average (how busy the machine was: other processes distort timings)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(shapes: Sequence[str] | None = None, workloads: Sequence[str] | None = None, *,
        candidates: Sequence[str] | None = None, repeats: int | None = None, quick: bool = False,
        memory: bool | None = None, text_batches: int | None = None, seed: int = 0,
        threads: int | None = None, progress: bool = True, precisions: Sequence[str] | None = None,
        peers: Sequence[str] | None = None) -> BenchResults:
    """Run the benchmark and return the results (nothing is printed but the progress bar).

    Defaults: DEFAULT_SHAPES, each shape's workloads, every candidate (each shape runs those it
    lists), 5 repeats, peak memory, torch's threads; with `quick`, QUICK_PLAN, 3 repeats, 1 text
    batch, no peak memory, 1 thread. `precisions` (settings.PRECISIONS) besides fp32 each run in a
    process of their own, and their rows join the same cases; so do `peers` (peers.PEERS; None:
    those installed, `()`: none).
    """
    settings = make_settings(shapes, workloads, candidates, repeats, quick, memory, text_batches, seed, threads,
                             precisions, peers=peers)
    return run_settings(settings, progress)


def run_settings(settings: Settings, progress: bool = True) -> BenchResults:
    """Run the benchmark as `settings` say (see `run`): this process's precision here, every
    other precision and every peer in a child process, one after the other."""
    results = _run_here(settings, progress)
    if settings.precision == "fp32" and settings.peer is None:
        for precision in settings.precisions:
            if precision != "fp32":
                merge_rows(results, run_child(settings, precision, progress))
        for peer in settings.peers:
            if any(shape_candidates(shape, replace(settings, peer=peer)) for shape in settings.shapes):
                merge_rows(results, run_child(settings, "fp32", progress, peer))
    return results


def child_arguments(settings: Settings, precision: str, json_path: str, peer: str | None = None) -> list[str]:
    """The `python -m bt_plugin bench` arguments that time `settings`' plan at `precision` alone
    (or `peer` alone, on the shapes it serves)."""
    shapes = [s for s in settings.shapes if shape_candidates(s, replace(settings, peer=peer))] if peer else settings.shapes
    arguments = ["--shapes", ",".join(shapes), "--candidates", ",".join(settings.candidates),
                 "--repeats", str(settings.repeats), "--text-batches", str(settings.text_batches),
                 "--no-memory", "--precision-of-this-process", precision, "--json", json_path,
                 "--peers", ",".join(settings.peers) or "none"]
    if peer:
        arguments += ["--peer-of-this-process", peer]
    workloads = [w for w in settings.workloads or () if any(SHAPES[s].serves(w) for s in shapes)]
    if workloads:
        arguments += ["--workloads", ",".join(workloads)]
    if settings.threads:
        arguments += ["--threads", str(settings.threads)]
    if settings.quick:
        arguments.append("--quick")
    return arguments


def run_child(settings: Settings, precision: str, progress: bool = True, peer: str | None = None) -> dict:
    """Time the plan at `precision` (or `peer`'s rows) in a fresh interpreter; its `--json` results."""
    from bt_plugin.tools.bench.peers import peer_environment

    with tempfile.TemporaryDirectory(prefix="bt_plugin_bench_child_") as tmp:
        target = os.path.join(tmp, "results.json")
        command = [sys.executable, "-m", "bt_plugin", "bench", *child_arguments(settings, precision, target, peer)]
        if not progress:
            command.append("--no-progress")
        environment = {**os.environ, **peer_environment(peer)} if peer else None
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE,
                              text=True, env=environment)
        if not os.path.exists(target):
            raise RuntimeError(f"the {peer or precision} benchmark process failed (exit {done.returncode}): "
                               f"{(done.stderr or '')[-2000:]}")
        with open(target) as results:
            return json.load(results)


def merge_rows(results: BenchResults, child: dict) -> None:
    """Add a child process's rows to the matching cases (same shape, workload and batches)."""
    fields = {f.name for f in dataclasses.fields(CandidateResult)}
    cases = {(c.shape, c.workload, c.batch_shape, round(c.real_fraction, 6)): c for c in results.cases}
    for raw in child["cases"]:
        case = cases.get((raw["shape"], raw["workload"], raw["batch_shape"], round(raw["real_fraction"], 6)))
        if case is None:
            continue
        for row in raw["rows"]:
            result = CandidateResult(**{key: value for key, value in row.items() if key in fields})
            result.matmul_gflops = result.matmul_gflops or raw["matmul_gflops"]
            case.rows.append(result)


def _run_here(settings: Settings, progress: bool = True) -> BenchResults:
    """Time the plan at this process's precision."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on, threads_were = hf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    hf_logging.disable_progress_bar()  # loading bars would tear through ours
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        with tempfile.TemporaryDirectory(prefix="bt_plugin_bench_") as tmp:
            return _run(settings, tokenizer, Path(tmp), progress)
    finally:
        torch.set_num_threads(threads_were)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _run(settings: Settings, tokenizer, workdir: Path, progress: bool) -> BenchResults:
    """Build every case, time shape by shape under one progress bar, then measure memory."""
    from tqdm import tqdm

    results = BenchResults(settings, machine_info())
    by_shape: dict[str, list[Case]] = {}
    for shape, workload in settings.plan():
        cases = build_cases(shape, workload, tokenizer, settings, len(tokenizer))
        if SHAPES[shape].config_class != "BertConfig":  # token types are BERT's
            for case in cases:
                case.batches = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in case.batches]
        by_shape.setdefault(shape, []).extend(cases)
    total = sum(len(cases) * len(shape_candidates(shape, settings)) for shape, cases in by_shape.items()) * settings.repeats
    with tqdm(total=total, unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for shape, cases in by_shape.items():
            results.cases += run_shape(shape, cases, settings, model_source(shape, workdir, settings.seed), bar)
    results.memory = run_memory(memory_jobs(settings, by_shape, tokenizer, workdir), settings, workdir)
    results.machine["load_average_after"] = _load_average()
    return results
