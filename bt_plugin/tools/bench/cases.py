"""The inputs: real paragraphs, reranking pairs, random tokens, the real-token sweep."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bt_plugin.tools.bench.settings import (DOCUMENT_CALLS, DOCUMENT_TOKENS, QUERY_CALLS, RERANK_PASSAGES, SHAPES,
                                            SMALL_BATCH_CALLS, SMALL_BATCH_SIZES, SWEEP_BATCH, SWEEP_FRACTIONS,
                                            TEXT_BATCH, TEXT_MAX_LENGTH, WORKLOADS, Settings)


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


def tokenized(texts: list[str], rows: int, tokenizer, padding_side: str = "right") -> list[dict]:
    """`texts` tokenized `rows` at a time, each batch padded to its longest (on `padding_side`:
    decoder embedders pad on the left), truncated at TEXT_MAX_LENGTH."""
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        return [
            dict(tokenizer(texts[i:i + rows], padding="longest", truncation=True,
                           max_length=TEXT_MAX_LENGTH, return_tensors="pt"))
            for i in range(0, len(texts), rows)
        ]
    finally:
        tokenizer.padding_side = side


def text_cases(shape: str, batches: int, tokenizer, seed: int, padding_side: str = "right") -> list[Case]:
    """Batches of real paragraphs, drawn seeded and shuffled, padded to the longest of each batch."""
    from bt_plugin.tools import corpus

    return [Case(shape, "text", tokenized(corpus.sample(batches * TEXT_BATCH, seed), TEXT_BATCH, tokenizer,
                                          padding_side))]


def sorted_text_cases(shape: str, batches: int, tokenizer, seed: int, padding_side: str = "right") -> list[Case]:
    """The text workload's paragraphs sorted by token length, longest first, then batched: what
    sentence-transformers' `encode` does before it batches (little padding is left to remove)."""
    from bt_plugin.tools import corpus

    texts = corpus.sample(batches * TEXT_BATCH, seed)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=TEXT_MAX_LENGTH)["input_ids"]]
    ordered = [text for _, text in sorted(zip(lengths, texts), key=lambda pair: -pair[0])]
    return [Case(shape, "sorted-text", tokenized(ordered, TEXT_BATCH, tokenizer, padding_side))]


def queries(count: int, seed: int) -> list[str]:
    """`count` real short queries: the first sentence of paragraphs drawn seeded and shuffled (a
    search query's length: about 10 to 30 tokens)."""
    from bt_plugin.tools import corpus

    return [paragraph.split(". ")[0] for paragraph in corpus.sample(count, seed)]


def query_cases(shape: str, tokenizer, seed: int) -> list[Case]:
    """QUERY_CALLS queries, one per call, in arrival order: a search service's requests."""
    return [Case(shape, "query", tokenized(queries(QUERY_CALLS, seed), 1, tokenizer))]


def documents(count: int, seed: int, tokenizer) -> list[str]:
    """`count` real paragraphs of DOCUMENT_TOKENS tokens each, drawn seeded from the corpus's paragraphs
    of that length (a stored passage's length; the whole corpus is tokenized to find them, so the
    draw is the same for the same seed and tokenizer)."""
    from bt_plugin.tools import corpus

    low, high = DOCUMENT_TOKENS
    pool = corpus.paragraphs()
    lengths = [len(ids) for ids in tokenizer(list(pool))["input_ids"]]
    fitting = [paragraph for paragraph, length in zip(pool, lengths) if low <= length <= high]
    return random.Random(seed).sample(fitting, count)


def document_cases(shape: str, tokenizer, seed: int) -> list[Case]:
    """DOCUMENT_CALLS documents, one per call, unpadded: the passages an indexing service embeds."""
    return [Case(shape, "document", tokenized(documents(DOCUMENT_CALLS, seed, tokenizer), 1, tokenizer))]


def small_batch_cases(shape: str, tokenizer, seed: int, padding_side: str = "right") -> list[Case]:
    """One case per size in SMALL_BATCH_SIZES: SMALL_BATCH_CALLS padded batches of that many queries
    (the batches an online service forms from the requests that arrive together)."""
    return [Case(shape, "small-batch", tokenized(queries(rows * SMALL_BATCH_CALLS, seed + rows), rows, tokenizer,
                                                 padding_side))
            for rows in SMALL_BATCH_SIZES]


def rerank_cases(shape: str, queries: int, seed: int) -> list[Case]:
    """`queries` reranking calls in arrival order: a paragraph's first sentence as the query
    against RERANK_PASSAGES other real paragraphs, scored RERANK_BATCH pairs at a time."""
    from bt_plugin.tools import corpus

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
        return text_cases(shape, settings.text_batches, tokenizer, seed, SHAPES[shape].padding_side)
    if workload == "sorted-text":
        return sorted_text_cases(shape, settings.text_batches, tokenizer, seed, SHAPES[shape].padding_side)
    if workload == "rerank":
        return rerank_cases(shape, settings.text_batches, seed)
    if workload == "no-padding":
        return [Case(shape, workload, [random_batch([128] * 8, 128, vocab, seed)])]
    if workload == "batch1":
        return [Case(shape, workload, [random_batch([16], 16, vocab, seed)])]
    if workload == "query":
        return query_cases(shape, tokenizer, seed)
    if workload == "document":
        return document_cases(shape, tokenizer, seed)
    if workload == "small-batch":
        return small_batch_cases(shape, tokenizer, seed, SHAPES[shape].padding_side)
    if workload == "sweep":
        return [
            Case(shape, workload, [random_batch(sweep_lengths(f, SWEEP_BATCH, settings.sweep_length, seed + i),
                                                settings.sweep_length, vocab, seed + i)])
            for i, f in enumerate(SWEEP_FRACTIONS)
        ]
    raise ValueError(f"unknown workload {workload!r}; valid: {', '.join(WORKLOADS)}")
