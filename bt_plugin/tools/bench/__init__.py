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

Workloads: `text` (batches of 32 paragraphs of real English, see `bt_plugin.tools.corpus`, tokenized
with the all-MiniLM-L6-v2 tokenizer, padded to the longest, truncated at 256), `no-padding`
(8 x 128 random tokens), `batch1` (1 x 16), `query` (16 real short queries, a paragraph's first
sentence, one per call in arrival order: a search service's requests), `small-batch` (8 padded
batches each of 2, 4 and 8 such queries, one case per size) and `sweep` (32 x 256 with
100/75/50/25/10 % real tokens; one row is always full length); `rerank` (`CrossEncoder.predict` in
arrival order: per query, a paragraph's first sentence against 64 other real paragraphs, 32 pairs
per batch, as many queries as text batches; sentence-transformers sorts each call's pairs by length
before batching; scores compared, the real-token share read from the masks the model received).
By default every token workload runs on `bert-base`, all but the sweep on `minilm`,
`modernbert-base`, `gte-base`, `minilm-lora`, `mpnet-base`, `deberta-v3-base` and
`t5-base-encoder`, and rerank on `minilm-reranker` (with the decoder shapes and
`--precisions fp32,bf16` added, 75 minutes on an idle 2-core Intel Xeon, 2026-12-04). `--quick` runs `minilm` (text, no-padding,
batch1, query, small-batch), `bert-small` (sweep at 32 x 128), `minilm-lora` and `gte-small`
(text), `minilm-reranker` (one rerank query) and `bert-tiny` (hidden 32, 6 layers: small-batch,
where a layer's per-call cost outweighs its matrix multiplies) with 3 repetitions, no memory
processes, on one torch thread (see QUICK_THREADS).

Peers: other engines, shown beside the candidates and never judged, each timed in a process of its
own (their thread pools slow torch down in a shared one): `onnxruntime` (bt_plugin.tools.bench.peers:
`torch.onnx.export(dynamo=True)` of stock's model, all graph optimizations, intra-op spinning off,
the same threads) and OpenVINO (f32 and its default precision) on the BERT-architecture shapes, when
`pip install 'bt-plugin[peers]'` installed them (`--peers none` leaves them out); `inductor` and
`inductor-bf16` (`torch.compile` of stock's model, fp32 and cast to bf16) only when `--peers` names
them: they compile each model's shapes for tens of seconds in an untimed warm-up, whose seconds
their rows show.

Timing: each candidate runs once untimed (its output is compared with stock on real tokens),
then each repetition runs every candidate once in a rotating order; the report gives the median
and the min-max. A fused candidate that fell back to the stock forward during the timed runs
makes the command fail: it would be exact but no faster. Peak memory: one forward of the longest
`text` batch on the bert shape, per candidate, each in a fresh process (`ru_maxrss` before and
after the forward, once the model is loaded, its weights read and the inputs built).

Modules, one concern each: `settings` (candidates, shapes, workloads, plans), `cases` (the inputs),
`models` (loading the candidates), `timing` (exactness check, limit, interleaved runs), `limit`
(real FLOPs and the matrix-multiply rate), `peers` (other engines), `memory` (peak memory in fresh processes), `results`
(what was measured), `runner` (a whole run), `report` (markdown, README block, plot), `cli`.
"""

from bt_plugin.tools.bench.cli import main
from bt_plugin.tools.bench.runner import run, run_settings

__all__ = ["main", "run", "run_settings"]
