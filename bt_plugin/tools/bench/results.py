"""What a run measured: per candidate, per case, peak memory, and the problems that fail a run."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields, replace

from bt_plugin.tools.bench.settings import BT_PLUGIN_PRECISIONS, CANDIDATES, QUALITY_FLOOR, Settings


TOLERANCE = 1e-5


NOISY_SPREAD = 0.3  # (max - min) / median above this marks a row noisy (with 3+ timed runs)


BUSY_SHARE = 0.1  # other processes using more of the machine's CPU time than this mark a case busy


FALLBACK_MESSAGE = "a fused candidate fell back: exact but no faster"


@dataclass
class CandidateResult:
    """One candidate on one case: timings (ms), exactness, and fused/fallback layer calls."""

    candidate: str
    times_ms: list[float] = field(default_factory=list)
    max_abs_diff: float | None = None
    fused_calls: int | None = None  # None: not a fused candidate
    fallback_calls: int | None = None
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    unavailable: str | None = None
    precision: str = "fp32"  # see settings.PRECISIONS
    min_cosine: float | None = None  # reduced precision: min cosine of pooled outputs to fp32 stock
    matmul_gflops: float | None = None  # the matrix-multiply rate in this row's dtype (its own process)
    computes_in: str | None = None  # what a peer reports computing in where its name does not fix it (`bf16`)
    warm_up_s: float | None = None  # a compiling peer's untimed first calls (its compile), seconds

    @property
    def label(self) -> str:
        """The candidate, with its precision when that is not fp32 (`packed autocast`), or what a peer
        reports computing in (`openvino (bf16)`)."""
        shown = self.computes_in is not None and not self.candidate.endswith(f"-{self.computes_in}")
        name = f"{self.candidate} ({self.computes_in})" if shown else self.candidate
        return name if self.precision == "fp32" else f"{name} {self.precision}"

    @property
    def reduced(self) -> bool:
        """Whether the row computes below float32: a reduced precision, or a peer reporting one."""
        return self.precision != "fp32" or self.computes_in not in (None, "f32")

    @property
    def median_ms(self) -> float | None:
        """Median of the timed runs (None when the candidate did not run)."""
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def noisy(self) -> bool:
        """Whether the timed runs spread over more than NOISY_SPREAD of their median."""
        if len(self.times_ms) < 3:
            return False
        return (max(self.times_ms) - min(self.times_ms)) > NOISY_SPREAD * self.median_ms

    @property
    def exact(self) -> bool:
        """Whether the output equals stock's on real tokens within TOLERANCE (at reduced precision:
        whether its pooled outputs keep a cosine of QUALITY_FLOOR to fp32 stock's)."""
        if self.reduced:
            return self.min_cosine is not None and self.min_cosine >= QUALITY_FLOOR
        return self.max_abs_diff is not None and self.max_abs_diff <= TOLERANCE

    @property
    def fused(self) -> bool:
        """Whether this is a bt_plugin kernel (its layer calls must all run fused)."""
        return CANDIDATES.get(self.candidate, ("", None))[1] is not None

    @property
    def peer(self) -> bool:
        """Whether this is another engine (bt_plugin.tools.bench.peers): shown, not judged."""
        return self.candidate not in CANDIDATES


@dataclass
class CaseResult:
    """Every candidate's result on one case."""

    shape: str
    workload: str
    batch_shape: str
    real_fraction: float
    rows: list[CandidateResult]
    passes: int = 1  # forwards over the case per timed run; times are per pass
    others_cpu: float | None = None  # share of the machine's CPU time other processes used meanwhile
    real_gflop: float | None = None  # the real tokens' work per pass (bt_plugin.tools.bench.limit.real_flops)
    matmul_gflops: float | None = None  # this process's matrix-multiply rate on the case's shapes

    @property
    def busy(self) -> bool:
        """Whether other processes competed for the CPUs during the timed runs."""
        return self.others_cpu is not None and self.others_cpu > BUSY_SHARE

    def row(self, candidate: str, precision: str = "fp32") -> CandidateResult | None:
        """The named candidate's row at a precision, if it was selected."""
        return next((r for r in self.rows if r.candidate == candidate and r.precision == precision), None)

    def ratio(self, row: CandidateResult) -> float | None:
        """Stock median / this candidate's median (higher is faster)."""
        stock = self.row("stock")
        if not (stock and stock.median_ms and row.median_ms):
            return None
        return stock.median_ms / row.median_ms

    def of_ideal(self, row: CandidateResult) -> float | None:
        """The speed-up over stock computing in the same precision (precision='bf16' computes what
        stock does under autocast, and so does a peer computing in bf16), times the real-token
        fraction: 100 % removes exactly the padding."""
        reduced = row.precision in BT_PLUGIN_PRECISIONS or row.computes_in == "bf16"
        same = self.row("stock", "autocast" if reduced else row.precision)
        if not (same and same.median_ms and row.median_ms):
            return None
        return same.median_ms / row.median_ms * self.real_fraction

    def of_limit(self, row: CandidateResult) -> float | None:
        """The candidate's rate on the real tokens' FLOPs / the measured matrix-multiply rate."""
        rate = row.matmul_gflops or self.matmul_gflops
        if not (self.real_gflop and rate and row.median_ms):
            return None
        return self.real_gflop / (row.median_ms / 1000) / rate


@dataclass
class MemoryResult:
    """Peak RSS increase (MiB) of one forward in a fresh process; raw ru_maxrss values in KiB."""

    shape: str
    workload: str
    candidate: str
    batch_shape: str
    peak_increase_mib: float | None = None
    maxrss_before_kib: int | None = None
    maxrss_after_kib: int | None = None
    rss_before_kib: int | None = None
    error: str | None = None


@dataclass
class BenchResults:
    """Everything one run measured; `to_dict()` is what `--json` writes."""

    settings: Settings
    machine: dict
    cases: list[CaseResult] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why the benchmark failed: inexact candidates, fused candidates that fell back."""
        found = []
        for case in self.cases:
            for row in case.rows:
                where = f"{case.shape} {case.workload} ({case.real_fraction:.0%} real): {row.label}"
                if row.unavailable or row.peer:
                    continue
                if not row.exact and row.reduced:
                    found.append(f"{where}: min cosine to fp32 stock {row.min_cosine} below {QUALITY_FLOOR} (FAIL)")
                elif not row.exact:
                    found.append(f"{where}: max abs diff {row.max_abs_diff} exceeds {TOLERANCE} (FAIL)")
                if row.fused and (row.fallback_calls or not row.fused_calls):
                    reasons = "; ".join(f"{r} (x{n})" for r, n in row.fallback_reasons.items()) or "no fused call"
                    found.append(f"{where}: {row.fallback_calls} fallback calls, {row.fused_calls} fused: "
                                 f"{reasons} -- {FALLBACK_MESSAGE}")
        return found

    def to_dict(self) -> dict:
        """Plain data, with the derived columns (median, ratio, share of ideal) and the problems."""
        data = asdict(self)
        for case, raw in zip(self.cases, data["cases"]):
            for row, raw_row in zip(case.rows, raw["rows"]):
                ratio = case.ratio(row)
                raw_row.update(median_ms=row.median_ms, ratio_to_stock=ratio, exact=row.exact, noisy=row.noisy,
                               share_of_ideal=case.of_ideal(row),
                               share_of_limit=case.of_limit(row))
        data["problems"] = self.problems()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BenchResults":
        """What `to_dict()` wrote (a `--json` file), measured fields only: the derived columns are
        recomputed, so the report, README block and plot can be drawn again without rerunning."""
        def build(kind, raw: dict):
            names = {f.name for f in fields(kind)}
            return kind(**{key: value for key, value in raw.items() if key in names})

        settings = build(Settings, {key: tuple(value) if isinstance(value, list) else value
                                    for key, value in data["settings"].items()})
        cases = [replace(build(CaseResult, raw), rows=[build(CandidateResult, row) for row in raw["rows"]])
                 for raw in data["cases"]]
        return cls(settings, dict(data["machine"]), cases, [build(MemoryResult, raw) for raw in data["memory"]])
