"""Which padded positions a model reads without the attention mask, decided once per model.

The fused paths write zeros at padded positions of the encoder output, where stock holds values
computed from the real keys. Anything that pools with the mask never sees them. A head that reads
padded positions does, so for such a model `packed` computes padded rows exactly as stock does
(keys still masked): no dense work is saved at those positions, but every output equals stock.

What a family's task heads read is per-architecture data: a spec's `head_reads` maps class-name
suffixes (transformers names heads `<Arch>For<Task>`) to `"every"` or `"first"` position (see
`patches/`). The one rule kept here is transformers' own convention that a submodule named
`pooler` reads the first position; a spec with `reads_padding` (SigLIP text pools the last
position) reads every position whatever the head. The other is that an encoder-decoder's decoder
cross-attends the encoder output under the encoder's mask: on a row with no real token every
key is masked, and stock's attention there reads the padded positions all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

EVERY_POSITION = "every"
FIRST_POSITION = "first"
LAST_POSITION = "last"  # a causal LM's next-token logits, a decoder classifier's last token
EMPTY_ROWS = "empty rows"  # every position of a row that has no real token


@dataclass(frozen=True)
class PaddedReads:
    """`where` padded positions are read (`"every"`, `"first"` or None) and `why`."""

    where: str | None
    why: str | None = None

    def computes_padded_rows(self, keep) -> bool:
        """Whether a call with this `(B, L)` key-padding mask must compute padded rows as stock."""
        if self.where == EVERY_POSITION:
            return True
        if self.where == EMPTY_ROWS:
            return not bool(keep.any(dim=1).all())
        if self.where == LAST_POSITION:
            return not bool(keep[:, -1].all())
        return self.where == FIRST_POSITION and not bool(keep[:, 0].all())

    def describe(self) -> str:
        if self.where == EVERY_POSITION:
            return f"computed as stock ({self.why})"
        if self.where == FIRST_POSITION:
            return f"zeros, except computed as stock when a row's first position is padding ({self.why})"
        if self.where == EMPTY_ROWS:
            return f"zeros, except computed as stock when a row has no real token ({self.why})"
        if self.where == LAST_POSITION:
            return f"zeros, except computed as stock when a row's last position is padding ({self.why})"
        return "zeros (nothing in the model reads them without the attention mask)"


def padded_reads(model: nn.Module, spec=None) -> PaddedReads:
    """Where `model` (the object that was converted: a base model or one with a task head)
    reads padded positions of its encoder output, from its spec's `reads_padding` and
    `head_reads` and from its pooler."""
    name = type(model).__name__
    if spec is not None and spec.reads_padding:
        return PaddedReads(EVERY_POSITION, f"{name} reads padded positions (its {spec.name} spec says so)")
    for suffix, where in (spec.head_reads if spec is not None else ()):
        if name.endswith(suffix):
            return PaddedReads(where, f"{name}'s head reads {where if where == EVERY_POSITION else 'the ' + where} position")
    pooler = next((path for path, module in model.named_modules() if path.rpartition(".")[2] == "pooler"), None)
    if pooler is not None:
        return PaddedReads(FIRST_POSITION, f"{name}.{pooler} reads the first position")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return PaddedReads(EMPTY_ROWS, f"{name}'s decoder cross-attends every position of a row with no real token")
    return PaddedReads(None)
