"""`python -m bt_plugin bench`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bt_plugin.tools.bench.peers import PEERS
from bt_plugin.tools.bench.report import README_END, README_START, _pyplot, plot_speedups, render_markdown, rewrite_readme
from bt_plugin.tools.bench.results import BenchResults, FALLBACK_MESSAGE
from bt_plugin.tools.bench.runner import run_settings
from bt_plugin.tools.bench.settings import (CANDIDATES, DEFAULT_REPEATS, DEFAULT_SHAPES, DOCUMENT_TOKENS,
                                            ENCODER_WORKLOADS, PRECISIONS, QUICK_PLAN, QUICK_REPEATS, QUICK_THREADS,
                                            SHAPES, WORKLOADS, make_settings)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m bt_plugin bench` options."""
    parser = argparse.ArgumentParser(prog="python -m bt_plugin bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    public = [name for name, shape in SHAPES.items() if shape.public]
    parser.add_argument("--quick", action="store_true", help=f"minilm ({', '.join(QUICK_PLAN['minilm'])}), "
                        "bert-small (sweep at 32 x 128), minilm-lora and gte-small (text), "
                        "minilm-reranker (rerank), bert-tiny (small-batch); 3 repeats, 1 text batch, no peak "
                        "memory, 1 torch thread")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per candidate (default {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)")
    parser.add_argument("--shapes", type=_names, default=None, help=f"comma-separated: {', '.join(public)} "
                        f"(default {','.join(DEFAULT_SHAPES)})")
    parser.add_argument("--workloads", type=_names, default=None, help=f"comma-separated: {', '.join(WORKLOADS)} "
                        f"(default: {', '.join(ENCODER_WORKLOADS)} everywhere; sweep on the bert shapes; "
                        "rerank on minilm-reranker, which runs nothing else; query and document: one real query, "
                        f"one real paragraph of {DOCUMENT_TOKENS[0]}-{DOCUMENT_TOKENS[1]} tokens per call, unpadded)")
    parser.add_argument("--candidates", type=_names, default=None,
                        help=f"comma-separated: {', '.join(CANDIDATES)} (default all; stock is always run)")
    parser.add_argument("--precisions", type=_names, default=None,
                        help="comma-separated: " + "; ".join(f"{name}: {what}" for name, what in PRECISIONS.items())
                        + " (default fp32; each precision is timed in a process of its own, ratios to fp32 stock)")
    parser.add_argument("--precision-of-this-process", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=_names, default=None,
                        help="comma-separated other engines, or none: " + "; ".join(f"{name}: {what}" for name, what
                        in PEERS.items()) + " (default: those installed, pip install 'bt-plugin[peers]', but the inductor ones; "
                        "rows shown beside the candidates, not judged)")
    parser.add_argument("--peer-of-this-process", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--text-batches", type=int, default=None, help="batches of 32 paragraphs in the text "
                        "workload (default 4, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads (default: torch's; {QUICK_THREADS} with --quick)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak memory in fresh processes (default: on, off with --quick)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw bt_plugin's speed-up against the real-token share, one line per shape, the ideal drawn (a PNG)")
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
                                 args.memory, args.text_batches, 0, args.threads, args.precisions,
                                 args.precision_of_this_process,
                                 () if args.peers == ("none",) else args.peers, args.peer_of_this_process)
        _check_outputs(args)
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
        plot_speedups(results, args.plot)
    return _verdict(results)


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the benchmark, not after it: README markers, matplotlib."""
    if args.readme:
        rewrite_readme(args.readme, None)
    if args.plot:
        _pyplot()


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
