"""What a benchmark run runs: the candidates, the model shapes, the workloads, the plans (default
and --quick) and their validation."""

from __future__ import annotations

from dataclasses import dataclass


# name -> (attn_implementation, bt_plugin kernel or None)
CANDIDATES: dict[str, tuple[str, str | None]] = {
    "stock": ("sdpa", None),
    "stock-eager": ("eager", None),
    "fastpath": ("sdpa", "fastpath"),
    "packed": ("sdpa", "packed"),
    "packed-prepack": ("sdpa", "packed"),
}
# what a candidate passes to bt_plugin.convert beyond its kernel: packed-prepack is the opt-in
# prepacked weight copy (bt_plugin.dispatch.derived)
CANDIDATE_OPTIONS: dict[str, dict] = {"packed-prepack": {"prepack": True}}


MEMORY_CANDIDATES = ("stock", "fastpath", "packed", "packed-prepack")


# What each candidate computes in. Every precision but fp32 is timed in a process of its own: bf16
# work (AMX tiles, AVX512-BF16) slows the fp32 work that follows it in the same process by about
# 30 % on some CPUs, so precisions must not be interleaved. Ratios are to fp32 stock.
PRECISIONS: dict[str, str] = {
    "fp32": "as loaded, float32",
    "bf16-weights": "loaded in bfloat16 (weights, activations and outputs bf16)",
    "autocast": "called under torch.autocast('cpu', dtype=torch.bfloat16)",
    "bf16": "bt_plugin's precision='bf16' (float32 model, its layers in bf16); bt_plugin candidates only",
    "auto": "bt_plugin's precision='auto' (bf16 per call where it pays, on a CPU with native bf16; else fp32); "
            "bt_plugin candidates only",
}
PRECISION_DTYPES = {"fp32": "float32", "bf16-weights": "bfloat16", "autocast": "bfloat16", "bf16": "bfloat16",
                    "auto": "bfloat16"}
BT_PLUGIN_PRECISIONS = ("bf16", "auto")  # bt_plugin's own precision options: stock does not run them
# Below this minimum cosine of pooled outputs to fp32 stock a reduced-precision row fails the run.
QUALITY_FLOOR = 0.999


# token tensors into the model
TOKEN_WORKLOADS = ("text", "no-padding", "batch1", "query", "document", "small-batch", "sweep")


# What most shapes run by default: real text, no padding, and the per-call workloads (one short
# query per call, one document per call, small padded batches of queries).
ENCODER_WORKLOADS = ("text", "no-padding", "batch1", "query", "document", "small-batch")


# sorted-text: the text workload's paragraphs sorted by length before batching (sentence-transformers'
# encode); in the quick plan (minilm), else asked for with --workloads
WORKLOADS = (*TOKEN_WORKLOADS, "sorted-text", "rerank")  # rerank: sentence-transformers' CrossEncoder.predict on text pairs


SWEEP_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1)


TEXT_BATCH, TEXT_MAX_LENGTH = 32, 256


RERANK_PASSAGES, RERANK_BATCH = 64, 32  # passages per query (one predict call each), pairs per batch


SWEEP_BATCH, SWEEP_LENGTH, QUICK_SWEEP_LENGTH = 32, 256, 128


# query: QUERY_CALLS real short queries (a paragraph's first sentence), one per call, in arrival order;
# small-batch: SMALL_BATCH_CALLS padded batches of each size in SMALL_BATCH_SIZES of such queries.
QUERY_CALLS, SMALL_BATCH_SIZES, SMALL_BATCH_CALLS = 16, (2, 4, 8), 8


# document: DOCUMENT_CALLS real paragraphs of DOCUMENT_TOKENS tokens (the shape's tokenizer, special
# tokens included), one per call, unpadded: an indexing service embedding the passages it stores.
DOCUMENT_CALLS, DOCUMENT_TOKENS = 8, (100, 200)


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
    reranker: bool = False  # a CrossEncoder: the real checkpoint with a seeded one-label head, or (with a
    # config) a causal LM of that shape scored by LogitScore on yes/no at the last token
    padding_side: str = "right"  # of the text workload's batches (decoder embedders pad on the left)

    def runs(self, candidate: str) -> bool:
        return self.candidates is None or candidate in self.candidates

    def serves(self, workload: str) -> bool:
        """A reranker shape runs the rerank workload only, every other shape the token workloads."""
        return (workload == "rerank") == self.reranker


SHAPES: dict[str, Shape] = {
    "bert-base": Shape("bert-base", {}),
    "minilm": Shape("minilm", None, ENCODER_WORKLOADS, memory=False),
    "bert-small": Shape("bert-small", dict(hidden_size=256, num_attention_heads=4,
                                           intermediate_size=1024, num_hidden_layers=2)),
    # Layers served by their own code on packed tokens (layercode): fastpath and packed would both
    # take that path, so only `packed` runs against stock.
    "modernbert-base": Shape("modernbert-base", {}, ENCODER_WORKLOADS, memory=False,
                             config_class="ModernBertConfig", model_class="ModernBertModel",
                             candidates=("stock", "packed")),
    "gte-base": Shape("gte-base", {}, ENCODER_WORKLOADS, memory=False,
                      config_class="GteConfig", model_class="GteModel", candidates=("stock", "packed")),
    # sentence-transformers' CrossEncoder on all-MiniLM-L6-v2 with a seeded, randomly initialised
    # one-label sequence-classification head (a reranker's shape; scores, not hidden states, compared).
    "minilm-reranker": Shape("minilm-reranker", None, ("rerank",), memory=False, reranker=True),
    "minilm-lora": Shape("minilm-lora", None, ENCODER_WORKLOADS, memory=False, adapter=True,
                         candidates=("stock", "packed")),
    # MPNet's relative position bias is added per sequence by `packed` (fastpath cannot).
    "mpnet-base": Shape("mpnet-base", {}, ENCODER_WORKLOADS, memory=False,
                        config_class="MPNetConfig", model_class="MPNetModel",
                        candidates=("stock", "packed"), attn_implementation="eager"),  # MPNet has no sdpa
    # Their layers' own attention code on bins of whole sequences (binned).
    # microsoft/deberta-v3-base's config (12 layers of hidden 768; DebertaV2Config's defaults are the
    # 24-layer, hidden-1536 xlarge shape, which this row measured before 2026-12-06)
    "deberta-v3-base": Shape("deberta-v3-base", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                     intermediate_size=3072, layer_norm_eps=1e-7,
                                                     relative_attention=True, position_buckets=256,
                                                     max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                                                     norm_rel_ebd="layer_norm", share_att_key=True,
                                                     max_position_embeddings=512, vocab_size=128100),
                             ENCODER_WORKLOADS, memory=False, config_class="DebertaV2Config",
                             model_class="DebertaV2Model", candidates=("stock", "packed"),
                             attn_implementation="eager"),  # DeBERTa has no sdpa
    "t5-base-encoder": Shape("t5-base-encoder", dict(vocab_size=32128), ENCODER_WORKLOADS,
                             memory=False, config_class="T5Config", model_class="T5EncoderModel",
                             candidates=("stock", "packed")),
    "gte-small": Shape("gte-small", dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                                         num_hidden_layers=2), memory=False, config_class="GteConfig",
                       model_class="GteModel", candidates=("stock", "packed")),
    # Decoder backbones used as encoders (random weights, the MiniLM tokenizer's vocabulary, left
    # padding as Qwen3-Embedding pads): Qwen3-0.6B's layer shape with 4 of its 28 layers, and
    # EmbeddingGemma-300m's (bidirectional Gemma 3) with 6 of its 24 (five sliding-window layers, one full).
    "qwen3-0.6b": Shape("qwen3-0.6b", dict(vocab_size=30522, hidden_size=1024, intermediate_size=3072,
                                           num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
                                           head_dim=128, pad_token_id=0, tie_word_embeddings=True),
                        ENCODER_WORKLOADS, memory=False, config_class="Qwen3Config",
                        model_class="Qwen3Model", candidates=("stock", "packed"), padding_side="left"),
    "embeddinggemma-300m": Shape("embeddinggemma-300m", dict(vocab_size=30522, hidden_size=768, intermediate_size=1152,
                                                             num_hidden_layers=6, num_attention_heads=3,
                                                             num_key_value_heads=1, head_dim=256, sliding_window=512,
                                                             use_bidirectional_attention=True, pad_token_id=0),
                                 ENCODER_WORKLOADS, memory=False, config_class="Gemma3TextConfig",
                                 model_class="Gemma3TextModel", candidates=("stock", "packed"), padding_side="left"),
    # Qwen3-Reranker's layout: sentence-transformers' CrossEncoder on a Qwen3 causal LM (the shape above)
    "qwen3-reranker": Shape("qwen3-reranker", dict(vocab_size=30522, hidden_size=1024, intermediate_size=3072,
                                                   num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
                                                   head_dim=128, pad_token_id=0, tie_word_embeddings=True),
                            ("rerank",), memory=False, config_class="Qwen3Config", model_class="Qwen3ForCausalLM",
                            candidates=("stock", "packed"), reranker=True),
    # Six layers of hidden size 32: the matrix multiplies take microseconds, so what a converted
    # layer costs per call around them decides its speed.
    "bert-tiny": Shape("bert-tiny", dict(hidden_size=32, num_attention_heads=2, intermediate_size=128,
                                         num_hidden_layers=6), ENCODER_WORKLOADS, memory=False),
    # Undocumented, for the smoke test: the real vocabulary (the text workload's token ids), tiny layers.
    "tiny": Shape("tiny", dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                               num_hidden_layers=2), public=False),
}


DEFAULT_SHAPES = ("bert-base", "minilm", "minilm-reranker", "modernbert-base", "gte-base", "minilm-lora", "mpnet-base",
                  "deberta-v3-base", "t5-base-encoder")


# --quick: every workload and every candidate, on light shapes (minutes, not an hour).
QUICK_PLAN: dict[str, tuple[str, ...]] = {
    "minilm": (*ENCODER_WORKLOADS, "sorted-text"), "bert-small": ("sweep",), "minilm-reranker": ("rerank",),
    "minilm-lora": ("text",), "gte-small": ("text",),  # the layer-code path: an adapter, a rotary family
    "bert-tiny": ("small-batch",),  # where a layer's per-call cost outweighs its matrix multiplies
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
    precisions: tuple[str, ...] = ("fp32",)  # fp32 always first: the ratios' reference
    precision: str = "fp32"  # what this process times (the others run in child processes)
    peers: tuple[str, ...] = ()  # other engines (bt_plugin.tools.bench.peers.PEERS), each timed in a child process
    peer: str | None = None  # the peer this process times instead of the candidates (a peer's child process)

    def plan(self) -> list[tuple[str, str]]:
        """The (shape, workload) pairs to run, in order."""
        pairs = []
        for shape in self.shapes:
            default = QUICK_PLAN.get(shape, SHAPES[shape].workloads) if self.quick else SHAPES[shape].workloads
            pairs += [(shape, w) for w in WORKLOADS if w in (self.workloads or default) and SHAPES[shape].serves(w)]
        return pairs


def shape_candidates(shape: str, settings: Settings) -> list[str]:
    """The selected candidates this shape runs at this process's precision (stock always first:
    the ratios need it; precision bf16 is bt_plugin's own option, stock does not run it). A peer's
    process runs its peer alone, on the shapes the peer serves."""
    if settings.peer:
        from bt_plugin.tools.bench.peers import serves

        return [settings.peer] if serves(SHAPES[shape]) else []
    return [name for name in settings.candidates if SHAPES[shape].runs(name) and computes_at(name, settings.precision)]


def computes_at(candidate: str, precision: str) -> bool:
    """Whether the candidate runs at `precision` on CPU. Stock runs every precision but bf16
    (bt_plugin's own option); a kernel is asked through its own input check: fastpath's fused kernel
    takes float32 only and steps aside under autocast, so at a reduced precision it would time the
    stock code it falls back to (and fail the run)."""
    kernel = CANDIDATES[candidate][1]
    if kernel is None:
        return precision not in BT_PLUGIN_PRECISIONS
    if precision == "fp32":
        return True
    import torch

    from bt_plugin.kernels import KERNELS

    hidden = torch.zeros(1, 1, 1, dtype=getattr(torch, PRECISION_DTYPES[precision])
                         if precision == "bf16-weights" else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision in ("autocast", *BT_PLUGIN_PRECISIONS)):
        return KERNELS[kernel].input_reason(hidden) is None


def make_settings(shapes, workloads, candidates, repeats, quick, memory, text_batches, seed, threads=None,
                  precisions=None, precision: str = "fp32", peers=None, peer: str | None = None) -> Settings:
    """Validate the choices and fill in the defaults (`quick` changes shapes, repeats, text batches,
    the sweep's length, memory and threads; `peers=None`: the installed ones)."""
    from bt_plugin.tools.bench.peers import PEERS, default_peers, installed_peers

    peers = default_peers() if peers is None else tuple(peers)
    shapes = tuple(shapes or (QUICK_PLAN if quick else DEFAULT_SHAPES))
    candidates = tuple(dict.fromkeys(["stock", *(candidates or CANDIDATES)]))  # stock is the reference
    precisions = tuple(dict.fromkeys(["fp32", *(precisions or ())]))
    for kind, chosen, valid in (("shape", shapes, SHAPES), ("workload", workloads or (), WORKLOADS),
                                ("candidate", candidates, CANDIDATES), ("precision", precisions + (precision,), PRECISIONS),
                                ("peer", peers + ((peer,) if peer else ()), PEERS)):
        unknown = [c for c in chosen if c not in valid]
        if unknown:
            public = [v for v in valid if kind != "shape" or SHAPES[v].public]
            raise ValueError(f"unknown {kind} {', '.join(unknown)}; valid: {', '.join(public)}")
    missing = [name for name in peers if name not in installed_peers()]
    if missing:
        raise ValueError(f"peer {', '.join(missing)} is not installed: pip install 'bt-plugin[peers]' "
                         "(the inductor peers need a C++ compiler on PATH)")
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
                    text_batches or (1 if quick else 4), memory and precision == "fp32", quick, seed, threads,
                    QUICK_SWEEP_LENGTH if quick else SWEEP_LENGTH, precisions, precision, peers, peer)
