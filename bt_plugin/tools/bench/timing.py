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
from bt_plugin.tools.bench.models import base_model, calling, forward, layer_counts, load_candidates
from bt_plugin.tools.bench.results import CandidateResult, CaseResult
from bt_plugin.tools.bench.settings import CANDIDATES, PRECISION_DTYPES, SHAPES, Settings, shape_candidates


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


def min_pooled_cosine(outputs: list[torch.Tensor], reference: list[torch.Tensor], case: Case) -> float:
    """The smallest cosine, over the rows of every batch, between mean-pooled outputs over real
    tokens (a reranker: the cosine of each batch's vector of scores)."""
    cosines = []
    for out, ref, batch in zip(outputs, reference, case.batches):
        if case.of_text:
            cosines.append(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item())
            continue
        weights = batch["attention_mask"][..., None].float()
        pooled = [(t * weights).sum(1) / weights.sum(1).clamp_min(1) for t in (out, ref)]
        cosines.append(torch.nn.functional.cosine_similarity(*pooled, dim=-1).min().item())
    return min(cosines)


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


def check_exactness(case: Case, models: dict[str, nn.Module], rows: dict[str, CandidateResult],
                    stock: nn.Module, precision: str = "fp32") -> float:
    """Untimed warm-up run of every candidate; its output is compared with fp32 `stock` on real
    tokens (at reduced precision, or a peer computing in one: the cosine of pooled outputs, and the
    max abs diff).

    Returns the milliseconds of the first timed candidate's warm-up run.
    """
    start = time.perf_counter()
    with received_masks(stock) if case.of_text else contextlib.nullcontext() as masks:
        reference = [forward(stock, b) for b in case.batches]
    if case.of_text:
        case.received_masks = masks
    first_ms = 1000 * (time.perf_counter() - start) if next(iter(models.values())) is stock else None
    for name, model in models.items():
        start = time.perf_counter()
        outputs = reference if model is stock else [forward(model, b, precision) for b in case.batches]
        first_ms = 1000 * (time.perf_counter() - start) if first_ms is None else first_ms
        rows[name].max_abs_diff = max_diff_on_real(outputs, reference, case)
        if rows[name].reduced:
            rows[name].min_cosine = min_pooled_cosine(outputs, reference, case)
    return first_ms


def peer_precision(name: str, model: nn.Module) -> str | None:
    """What a peer reports computing in (OpenVINO's compiled precision, inductor's `f32` or `bf16`); None
    for the candidates, the peers that report none, and float32 where the name already says so
    (`openvino-f32`)."""
    reported = getattr(model, "computes_in", None)
    return None if reported is None or (reported == "f32" and name.endswith("-f32")) else reported


def time_run(model: nn.Module, case: Case, passes: int = 1, precision: str = "fp32") -> float:
    """Milliseconds per pass, over `passes` passes of one forward on each batch of the case."""
    with torch.inference_mode(), calling(precision):
        start = time.perf_counter()
        for _ in range(passes):
            for batch in case.batches:
                model(**batch)
        return 1000 * (time.perf_counter() - start) / passes


def passes_per_run(case: Case, first: nn.Module, warm_up_ms: float, precision: str = "fp32") -> int:
    """Passes per timed run so that one takes at least MIN_RUN_MS (as timeit's autorange): a
    millisecond-scale forward timed alone would measure the scheduler of a busy machine."""
    if warm_up_ms >= 2 * MIN_RUN_MS:  # no need to time a long forward again
        return 1
    return max(1, min(MAX_PASSES, math.ceil(MIN_RUN_MS / max(time_run(first, case, 1, precision), 1e-3))))


# What a peer reporting a reduced precision (OpenVINO's INFERENCE_PRECISION_HINT) computes in.
PEER_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def computing_dtype(models: dict[str, nn.Module], precision: str) -> torch.dtype:
    """The dtype this process's rows compute in: `precision`'s, or a peer's reduced one."""
    reported = next((getattr(m, "computes_in", None) for m in models.values()), None)
    return PEER_DTYPES.get(reported) or getattr(torch, PRECISION_DTYPES[precision])


def case_limit(case: Case, models: dict[str, nn.Module], stock: nn.Module,
               precision: str = "fp32") -> tuple[float | None, float | None]:
    """(GFLOP of the real tokens per pass over the case, this process's matrix-multiply GFLOP/s on
    the case's shapes in the dtype its rows compute in, measured now), see bt_plugin.tools.bench.limit;
    (None, None) without a fused candidate or a reduced-precision peer (an fp32 peer's rows take
    the rate the candidates' process measured). The layers are those bt_plugin converts (in a fused
    candidate, or would convert in stock), their linears stock's."""
    import bt_plugin
    from bt_plugin.tools.bench import limit

    fused = [m for name, m in models.items() if name in CANDIDATES and CANDIDATES[name][1]]
    dtype = computing_dtype(models, precision)
    if not fused and dtype == torch.float32:
        return None, None
    model = base_model(stock)
    paths = [layer.path for layer in bt_plugin.explain(base_model(fused[0]) if fused else model).layers]
    lengths = [int(n) for mask in case.masks for n in mask.sum(dim=1)]
    work = limit.real_flops(limit.encoder_linears(model, paths), lengths, limit.attention_width(model.config),
                            len(paths))
    rate = limit.matmul_rate(limit.encoder_linears(model, paths[:1]), [int(mask.sum()) for mask in case.masks],
                             dtype=dtype)
    return work / 1e9, rate / 1e9


def time_case(case: Case, models: dict[str, nn.Module], repeats: int, bar, stock: nn.Module | None = None,
              precision: str = "fp32") -> CaseResult:
    """Warm up and check against fp32 `stock` (default: the stock candidate), measure the
    matrix-multiply limit, then `repeats` interleaved repetitions (rotating order) of every
    candidate, called at `precision`."""
    stock = models["stock"] if stock is None else stock
    rows = {name: CandidateResult(name, precision=precision, computes_in=peer_precision(name, m))
            for name, m in models.items()}
    first = next(iter(models.values()))
    passes = passes_per_run(case, first, check_exactness(case, models, rows, stock, precision), precision)
    real_gflop, matmul_gflops = case_limit(case, models, stock, precision)
    gc.collect()
    before = {name: layer_counts(m) for name, m in models.items() if name in CANDIDATES and CANDIDATES[name][1]}
    names, cpu_before = list(models), cpu_snapshot()
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            rows[name].times_ms.append(time_run(models[name], case, passes, precision))
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
    if settings.peer:
        return run_peer_shape(shape, cases, settings, source, bar) if names else []
    models, unavailable = load_candidates(source, names, SHAPES[shape], settings.precision)
    stock = None
    if settings.precision != "fp32":  # the fp32 reference, untimed (its times come from the fp32 process)
        stock = load_candidates(source, ["stock"], SHAPES[shape])[0]["stock"]
    bar.total -= len(unavailable) * settings.repeats * len(cases)
    bar.refresh()
    results = []
    for case in cases:
        bar.set_description(f"{shape} {case.workload}" + ("" if case.of_text else f" {case.real_fraction:.0%}"))
        result = time_case(case, models, settings.repeats, bar, stock, settings.precision)
        timed = {row.candidate: row for row in result.rows}
        result.rows = [timed.get(n) or CandidateResult(n, unavailable=unavailable[n], precision=settings.precision)
                       for n in names]
        results.append(result)
    del models
    gc.collect()
    return results


def run_peer_shape(shape: str, cases: list[Case], settings: Settings, source: str, bar) -> list[CaseResult]:
    """Time this process's peer on one shape's cases: stock's model (loaded untimed, the fp32
    reference) exported to the peer, one model for every case."""
    import tempfile
    from pathlib import Path

    from bt_plugin.tools.bench.peers import peer_model

    stock = load_candidates(source, ["stock"], SHAPES[shape])[0]["stock"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bt_plugin_bench_peer_") as tmp:
        model = peer_model(settings.peer, base_model(stock), Path(tmp), settings.threads)
        for case in cases:
            bar.set_description(f"{shape} {case.workload} {settings.peer}")
            warm_up = getattr(model, "warm_up", None)
            if warm_up is not None:  # a compiling peer compiles this case's shapes before it is timed
                warm_up(case.batches)
            results.append(time_case(case, {settings.peer: model}, settings.repeats, bar, stock))
            if warm_up is not None:
                results[-1].rows[0].warm_up_s = model.warm_up_s
        del model
    del stock
    gc.collect()
    return results
