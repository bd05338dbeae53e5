"""The report: markdown tables, the README block, the speed-up chart."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from bt_plugin.kernels.device_table import AUTO_KERNEL
from bt_plugin.tools.bench.results import BUSY_SHARE, BenchResults, CandidateResult, CaseResult, NOISY_SPREAD


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _ms(value: float | None) -> str:
    """Milliseconds with one decimal below a second, whole above."""
    return "-" if value is None else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _row_cells(case: CaseResult, row: CandidateResult) -> list[str]:
    """One table row (see CASE_COLUMNS)."""
    if row.unavailable:
        return [row.label, f"unavailable: {row.unavailable}", "", "", f"{case.real_fraction:.0%}", "", "", "", ""]
    ratio = case.ratio(row)
    diff = f"{row.max_abs_diff:.1e} {'ok' if row.exact else 'FAIL'}"
    if row.reduced:
        diff = f"cos {row.min_cosine:.5f} {'ok' if row.exact else 'FAIL'}"
    calls = "-" if not row.fused else f"{row.fused_calls} / {row.fallback_calls}"
    spread = f"{_ms(min(row.times_ms))}–{_ms(max(row.times_ms))}" + (" noisy" if row.noisy else "")
    label = row.label if row.warm_up_s is None else f"{row.label} (compiled in {row.warm_up_s:.0f} s)"
    return [
        label, _ms(row.median_ms), spread,
        "-" if ratio is None else f"{ratio:.2f}x", f"{case.real_fraction:.0%}", "-" if case.of_ideal(row) is None else f"{case.of_ideal(row):.0%}",
        "-" if case.of_limit(row) is None else f"{case.of_limit(row):.0%}", diff, calls,
    ]


CASE_COLUMNS = ("candidate", "median ms", "min–max ms", "ratio", "real tokens", "of ideal", "of limit",
                "vs fp32 stock (real tokens)", "fused / fallback calls")


def markdown_table(header: Sequence[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table; every column but the first is right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def render_cases(results: BenchResults) -> list[str]:
    """One markdown table per (shape, workload); the sweep's fractions are row groups."""
    groups: dict[tuple[str, str], list[CaseResult]] = {}
    for case in results.cases:
        groups.setdefault((case.shape, case.workload), []).append(case)
    tables = []
    for (shape, workload), cases in groups.items():
        batches = "; ".join(dict.fromkeys(c.batch_shape for c in cases))
        passes = max(c.passes for c in cases)
        repeated = f"; up to {passes} passes per timed run, ms per pass" if passes > 1 else ""
        busy = [c.others_cpu for c in cases if c.busy]
        busy = f"; busy: other processes used up to {max(busy):.0%} of the CPUs" if busy else ""
        rates = sorted({round(c.matmul_gflops) for c in cases if c.matmul_gflops})
        reduced = sorted({round(r.matmul_gflops) for c in cases for r in c.rows if r.matmul_gflops})
        limit = ""
        if rates:
            span = str(rates[0]) if len(rates) == 1 else f"{rates[0]}–{rates[-1]}"
            limit = f"; matrix-multiply limit {span} GFLOP/s"
            if reduced:
                low = reduced[0] if len(reduced) == 1 else f"{reduced[0]}–{reduced[-1]}"
                limit += f" (bf16: {low})"
        title = f"**{shape} · {workload}** (batches x rows x padded length: {batches}{repeated}{limit}{busy})"
        rows = [_row_cells(case, row) for case in cases for row in case.rows]
        tables.append(title + "\n\n" + markdown_table(CASE_COLUMNS, rows))
    return tables


def render_memory(results: BenchResults) -> str | None:
    """The peak-memory table (None when memory was not measured)."""
    if not results.memory:
        return None
    stock = {(m.shape, m.workload): m.peak_increase_mib for m in results.memory if m.candidate == "stock"}
    rows = []
    for m in results.memory:
        base = stock.get((m.shape, m.workload))
        value = m.error or f"{m.peak_increase_mib:.0f}"
        versus = f"{m.peak_increase_mib / base:.2f}x" if not m.error and base else "-"
        rows.append([f"{m.shape} · {m.workload}", m.batch_shape, m.candidate, value, versus])
    header = ("case", "batch", "candidate", "peak RSS increase of one forward (MiB)", "vs stock")
    return "**Peak memory** (fresh process per candidate, ru_maxrss after - before the forward)\n\n" + \
        markdown_table(header, rows)


def machine_line(results: BenchResults) -> str:
    """One line naming the machine, the versions, the date and how the numbers were taken."""
    m, s = results.machine, results.settings
    threads = f"{m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}"
    return (f"Measured on {m['cpu']}, {m['cores']} cores ({threads}; 1-minute load average "
            f"{m['load_average_before']} before, {m.get('load_average_after')} after), torch {m['torch']}, "
            f"transformers {m['transformers']}, Python {m['python']}, {m['date']}; CPU native precisions: "
            f"{', '.join(m.get('native_precisions') or []) or 'none'}; {_precisions(s)}, "
            f"`torch.inference_mode()`, median of {s.repeats} interleaved runs"
            f"{' (--quick)' if s.quick else ''}; ratio = fp32 stock median / candidate median; of ideal = the "
            f"speed-up over stock in the same precision (autocast for precision='bf16' and bf16 peers) / (1 / "
            f"real-token fraction); of limit = the real tokens' FLOPs per second / the faster matrix-multiply "
            f"rate of F.linear and oneDNN on prepacked weights, measured on the same shapes just before, in the "
            f"dtype the row computes in (bt_plugin.tools.bench.limit); vs fp32 stock = max abs diff on real "
            f"tokens (fp32 rows), min cosine of mean-pooled outputs (reduced precision, a peer's included).")


def _precisions(settings) -> str:
    """What the rows' precisions mean (each one timed in a process of its own)."""
    from bt_plugin.tools.bench.settings import PRECISIONS

    if settings.precisions == ("fp32",):
        return "fp32"
    return ("precisions, each timed in a process of its own: "
            + "; ".join(f"{name} = {PRECISIONS[name]}" for name in settings.precisions))


def noise_line(results: BenchResults) -> str | None:
    """A warning when timings spread widely: a busy machine, whose contention interleaving cannot
    cancel (it slows a kernel with many small operations more than one with few large ones)."""
    rows = [row for case in results.cases for row in case.rows if row.times_ms]
    noisy, busy = sum(row.noisy for row in rows), sum(case.busy for case in results.cases)
    if not (noisy or busy):
        return None
    return (f"**Busy machine:** {busy} of {len(results.cases)} cases ran while other processes used more than "
            f"{BUSY_SHARE:.0%} of the CPUs, and {noisy} of {len(rows)} rows spread over more than "
            f"{NOISY_SPREAD:.0%} of their median (marked `noisy`). Contention slows kernels made of many "
            "small operations most, which interleaving cannot cancel: rerun when the machine is idle"
            + (", or compare with `--threads 1`." if results.settings.threads != 1 else "."))


def render_markdown(results: BenchResults) -> str:
    """The whole report: what the CLI prints and what `--readme` puts between the markers."""
    parts = [*render_cases(results), render_memory(results), noise_line(results), machine_line(results)]
    return "\n\n".join(p for p in parts if p)


def rewrite_readme(path: str | Path, block: str | None) -> None:
    """Replace what lies between the bench markers of a README with `block` (None: only check)."""
    path = Path(path)
    text = path.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"{path} needs exactly one {README_START} ... {README_END} block")
    if block is not None:
        path.write_text(pattern.sub(lambda _: f"{README_START}\n{block}\n{README_END}", text))


# The candidate the chart draws: what `auto` runs on a CPU.
PLOTTED_CANDIDATE = AUTO_KERNEL["cpu"]


def speedup_series(results: BenchResults, candidate: str = PLOTTED_CANDIDATE) -> dict[str, list[tuple[float, float]]]:
    """Per shape (one line per family): `(real-token fraction, speed-up over stock)` of every fp32
    case the candidate ran (text, no-padding, batch1, query, document, each small batch, each sweep
    point, rerank), sorted by fraction; the chart's data."""
    series: dict[str, list[tuple[float, float]]] = {}
    for case in results.cases:
        row = case.row(candidate)
        ratio = case.ratio(row) if row is not None and row.median_ms else None
        if ratio is not None:
            series.setdefault(case.shape, []).append((case.real_fraction, ratio))
    return {shape: sorted(points) for shape, points in series.items()}


def plot_speedups(results: BenchResults, path: str | Path, candidate: str = PLOTTED_CANDIDATE) -> None:
    """The chart: bt_plugin's speed-up over stock against the real-token share of the batch, one line
    per family (shape), with the padding-free ideal 1 / share drawn; written as a PNG."""
    plt = _pyplot()
    series = speedup_series(results, candidate)
    if not series:
        raise ValueError(f"--plot needs a case that {candidate!r} ran")
    figure, ax = plt.subplots(figsize=(7.5, 4.8))
    low = min(fraction for points in series.values() for fraction, _ in points)
    curve = [low + (1 - low) * i / 100 for i in range(101)]
    ax.plot(curve, [1 / f for f in curve], "k--", label="ideal (1 / real-token share)")
    colours, markers = plt.get_cmap("tab20").colors, "os^Dv"  # distinct up to 20 shapes (tab10 repeats after 10)
    for i, (shape, points) in enumerate(series.items()):
        ax.plot(*zip(*points), color=colours[i % len(colours)], marker=markers[i % len(markers)], label=shape)
    machine = results.machine
    ax.set(xlabel="real tokens in the batch (share of padded positions)", ylabel="speed-up over stock (x)",
           yscale="log", title=f"bt_plugin {candidate}, fp32, {machine.get('cpu', 'CPU')}, {machine.get('date', '')}")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:.0%}"))
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(str(path), dpi=110)
    plt.close(figure)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a SystemExit saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'bt-plugin[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
