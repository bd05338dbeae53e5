"""Timing: the untimed exactness check, the matrix-multiply limit, interleaved repetitions, the
machine's other load."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time

import torch
from torch import nn

from bt_plugin.tools.bench.cases import Case
from bt_plugin.tools.bench.models import base_model, forward, layer_counts, load_candidates
from bt_plugin.tools.bench.results import CandidateResult, CaseResult
from bt_plugin.tools.bench.settings import CANDIDATES, SHAPES, Settings, shape_candidates


MIN_RUN_MS, MAX_PASSES = 100.0, 50  # short forwards are repeated within one timed run


def max_diff_on_real(outputs: list[torch.Tensor], reference: list[torch.Tensor], case: Case) -> float:
    """Max abs difference over the real-token positions of every batch of the case (over every
    score of a reranker)."""
    diffs = []
    for out, ref, batch in zip(outputs, reference, case.batches):
        if case.of_text:
            diffs.append((out - ref).abs().max().item())
            continue
        real = batch["attention_mask"].bool()
        diffs.append((out[real] - ref[real]).abs().max().item())
    return max(diffs)


@contextlib.contextmanager
def received_masks(model: nn.Module):
    """Yields the list of attention masks `model`'s encoder receives inside the block (a
    CrossEncoder tokenizes and pads its pairs itself, and calls its model's forward, not the module)."""
    masks: list[torch.Tensor] = []
    hook = base_model(model).base_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    try:
        yield masks
    finally:
        hook.remove()


def check_exactness(case: Case, models: dict[str, nn.Module], rows: dict[str, CandidateResult]) -> float:
    """Untimed warm-up run of every candidate; its output is compared with stock on real tokens.

    Returns the milliseconds of stock's warm-up run.
    """
    stock = models["stock"]
    start = time.perf_counter()
    with received_masks(stock) if case.of_text else contextlib.nullcontext() as masks:
        reference = [forward(stock, b) for b in case.batches]
    if case.of_text:
        case.received_masks = masks
    stock_ms = 1000 * (time.perf_counter() - start)
    for name, model in models.items():
        outputs = reference if name == "stock" else [forward(model, b) for b in case.batches]
        rows[name].max_abs_diff = max_diff_on_real(outputs, reference, case)
    return stock_ms


def time_run(model: nn.Module, case: Case, passes: int = 1) -> float:
    """Milliseconds per pass, over `passes` passes of one forward on each batch of the case."""
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(passes):
            for batch in case.batches:
                model(**batch)
        return 1000 * (time.perf_counter() - start) / passes


def passes_per_run(case: Case, stock: nn.Module, warm_up_ms: float) -> int:
    """Passes per timed run so that one takes at least MIN_RUN_MS (as timeit's autorange): a
    millisecond-scale forward timed alone would measure the scheduler of a busy machine."""
    if warm_up_ms >= 2 * MIN_RUN_MS:  # no need to time a long forward again
        return 1
    return max(1, min(MAX_PASSES, math.ceil(MIN_RUN_MS / max(time_run(stock, case), 1e-3))))


def case_limit(case: Case, models: dict[str, nn.Module]) -> tuple[float | None, float | None]:
    """(GFLOP of the real tokens per pass over the case, this process's matrix-multiply GFLOP/s on
    the case's shapes, measured now), see bt_plugin.tools.bench.limit; (None, None) without a
    fused candidate. The layers are those a fused candidate converted, their linears stock's."""
    import bt_plugin
    from bt_plugin.tools.bench import limit

    fused = [m for name, m in models.items() if CANDIDATES[name][1]]
    if not fused:
        return None, None
    model = base_model(models["stock"])
    paths = [layer.path for layer in bt_plugin.explain(base_model(fused[0])).layers]
    lengths = [int(n) for mask in case.masks for n in mask.sum(dim=1)]
    work = limit.real_flops(limit.encoder_linears(model, paths), lengths, limit.attention_width(model.config),
                            len(paths))
    rate = limit.matmul_rate(limit.encoder_linears(model, paths[:1]), [int(mask.sum()) for mask in case.masks])
    return work / 1e9, rate / 1e9


def time_case(case: Case, models: dict[str, nn.Module], repeats: int, bar) -> CaseResult:
    """Warm up and check, measure the matrix-multiply limit, then `repeats` interleaved repetitions
    (rotating order) of every candidate."""
    rows = {name: CandidateResult(name) for name in models}
    passes = passes_per_run(case, models["stock"], check_exactness(case, models, rows))
    real_gflop, matmul_gflops = case_limit(case, models)
    gc.collect()
    before = {name: layer_counts(m) for name, m in models.items() if CANDIDATES[name][1]}
    names, cpu_before = list(models), cpu_snapshot()
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            rows[name].times_ms.append(time_run(models[name], case, passes))
            bar.update(1)
    others = others_cpu_share(cpu_before, cpu_snapshot())
    for name, (fused0, fallback0, reasons0) in before.items():
        fused1, fallback1, reasons1 = layer_counts(models[name])
        rows[name].fused_calls, rows[name].fallback_calls = fused1 - fused0, fallback1 - fallback0
        rows[name].fallback_reasons = dict(reasons1 - reasons0)
    return CaseResult(case.shape, case.workload, case.batch_shape, case.real_fraction, list(rows.values()),
                      passes, others, real_gflop, matmul_gflops)


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU-seconds the whole machine was busy, CPU-seconds of this process, wall seconds), or None
    where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, own.user + own.system, time.monotonic()


def others_cpu_share(before, after) -> float | None:
    """The share of the machine's CPU capacity that other processes used between two snapshots
    (None over less than a second: /proc/stat counts in ticks of 10 ms)."""
    if before is None or after is None or after[2] - before[2] < 1.0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return min(1.0, max(0.0, others / ((after[2] - before[2]) * (os.cpu_count() or 1))))


def run_shape(shape: str, cases: list[Case], settings: Settings, source: str, bar) -> list[CaseResult]:
    """Load every candidate of one shape (same checkpoint, same weights) and time its cases."""
    names = shape_candidates(shape, settings)
    models, unavailable = load_candidates(source, names, SHAPES[shape])
    bar.total -= len(unavailable) * settings.repeats * len(cases)
    bar.refresh()
    results = []
    for case in cases:
        bar.set_description(f"{shape} {case.workload}" + ("" if case.of_text else f" {case.real_fraction:.0%}"))
        result = time_case(case, models, settings.repeats, bar)
        timed = {row.candidate: row for row in result.rows}
        result.rows = [timed.get(n) or CandidateResult(n, unavailable=unavailable[n]) for n in names]
        results.append(result)
    del models
    gc.collect()
    return results
