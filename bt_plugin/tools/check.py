"""`python -m bt_plugin check PATH`: convert a model and verify it matches stock on a padded batch.

Loads the model twice over (a stock copy and a converted copy), runs both on a right-padded batch
of sentences of different lengths, compares `last_hidden_state` on real tokens, and reports per
encoder layer what ran fused. Text models only (`main_input_name == "input_ids"`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

TOLERANCE = 1e-5  # fp32 max abs difference on real tokens

SAMPLE_LENGTHS = (48, 29, 13, 6, 2)  # real lengths of the random-id batch (capped by the model)

# Any of these in a local model directory means a tokenizer was saved with the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


@dataclass
class CheckResult:
    """The outcome of `check`; `passed` is False when the model was not converted or differs."""

    path: str
    model: str | None = None
    kernel: str = "auto"
    reason: str | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    batch: str | None = None
    max_abs_diff: float | None = None
    tolerance: float = TOLERANCE
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "model": self.model, "kernel": self.kernel, "reason": self.reason,
            "layers": self.layers, "batch": self.batch, "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance, "passed": self.passed,
        }


def load_stock(path: str):
    """The model at `path` in fp32 eval mode, stock (reverted if BT_PLUGIN converted it on load)."""
    import torch
    from transformers import AutoModel

    from bt_plugin import is_converted, revert

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    if is_converted(model):
        revert(model)
    return model


def load_tokenizer(path: str):
    """The tokenizer saved with the model, or None when there is none.

    A local directory must hold tokenizer files: transformers would otherwise build an empty-vocab
    tokenizer from the config alone.
    """
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # no tokenizer files (or an unusable one): fall back to random ids
        return None


def _max_length(config, tokenizer=None) -> int:
    limits = [128, getattr(config, "max_position_embeddings", None) or 128]
    if tokenizer is not None and 0 < getattr(tokenizer, "model_max_length", 0) < 10**6:
        limits.append(tokenizer.model_max_length)
    return min(limits)


def sample_batch(config, tokenizer=None) -> dict:
    """A right-padded batch of sentences of different lengths: `input_ids`, `attention_mask`, ...

    With a tokenizer it encodes the demo sentences; without one it draws random ids in
    `[min(5, vocab_size - 1), vocab_size)` for rows of `SAMPLE_LENGTHS` real tokens.
    """
    import torch

    width = _max_length(config, tokenizer)
    if tokenizer is not None:
        from bt_plugin.tools.demo import SENTENCES

        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        batch = dict(tokenizer(SENTENCES, padding=True, truncation=True, max_length=width, return_tensors="pt"))
        if int(batch["input_ids"].max()) < int(config.vocab_size):
            return batch
        # a tokenizer whose ids do not fit the model's vocabulary: use random ids instead
    vocab = int(config.vocab_size)
    lengths = sorted({max(1, min(n, width)) for n in SAMPLE_LENGTHS}, reverse=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (len(lengths), lengths[0]), generator=generator)
    mask = torch.zeros_like(ids)
    pad = getattr(config, "pad_token_id", None) or 0
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
        ids[row, real:] = pad
    return {"input_ids": ids, "attention_mask": mask}


def hidden_states(model, batch: dict):
    """`last_hidden_state` of the model (of its encoder for encoder-decoder models)."""
    import torch

    runner = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
    with torch.inference_mode():
        output = runner(**batch)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def max_abs_diff(a, b, mask) -> float:
    """Max abs difference of `a` and `b` over the real-token positions of `mask`."""
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def check(path: str, kernel: str = "auto") -> CheckResult:
    """Load `path`, convert a copy with `kernel`, compare it with stock; see `CheckResult`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bt_plugin

    result = CheckResult(path, kernel=kernel)
    stock = load_stock(path)
    result.model = type(stock).__name__
    if stock.main_input_name != "input_ids":
        result.reason = (f"check supports text models only ({result.model} takes "
                         f"{stock.main_input_name!r}, not 'input_ids')")
        return result
    fused = copy.deepcopy(stock)
    try:
        bt_plugin.convert(fused, kernel=kernel)
    except ValueError as error:
        result.reason = f"not converted: {error}"
        result.layers = [layer.__dict__ | {"status": layer.status}
                         for layer in bt_plugin.explain(stock, kernel=kernel).layers]
        return result
    batch = {k: v for k, v in sample_batch(stock.config, load_tokenizer(path)).items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
    mask = batch["attention_mask"]
    result.batch = (f"{mask.shape[0]} rows padded to {mask.shape[1]} tokens, "
                    f"{mask.float().mean().item():.0%} real tokens")
    result.max_abs_diff = max_abs_diff(hidden_states(stock, batch), hidden_states(fused, batch), mask)
    result.layers = [layer.__dict__ | {"status": layer.status} for layer in bt_plugin.explain(fused).layers]
    result.passed = result.max_abs_diff <= TOLERANCE
    return result


def format_text(result: CheckResult) -> str:
    """A human-readable report: header, per-layer table, verdict."""
    lines = [f"{result.model or result.path} (kernel={result.kernel})"]
    if result.layers:
        lines.append(f"  {'layer':<28} {'status':<22} {'kernel':<9} {'fused':>5} {'fallback':>8}  reason")
        for layer in result.layers:
            lines.append(f"  {layer['path']:<28} {layer['status']:<22} {layer['kernel'] or '-':<9} "
                         f"{layer['fused_calls']:>5} {layer['fallback_calls']:>8}  {layer['reason'] or ''}")
    if result.batch:
        lines.append(f"batch: {result.batch}")
    if result.max_abs_diff is not None:
        lines.append(f"max abs difference to stock on real tokens: {result.max_abs_diff:.2e} "
                     f"(tolerance {result.tolerance:.0e})")
    if result.reason:
        lines.append(result.reason)
    lines.append("PASS" if result.passed else "FAIL")
    return "\n".join(lines)


def run(path: str, kernel: str = "auto", as_json: bool = False) -> int:
    """Run `check`, print the report (text or one JSON object); 0 when it passed, else 1."""
    result = check(path, kernel)
    print(json.dumps(result.to_dict()) if as_json else format_text(result))
    return 0 if result.passed else 1
