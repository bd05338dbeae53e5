"""`python -m bt_plugin [demo]`: load a model with the plugin, compare it with stock, time both.

`python -m bt_plugin bench [...]`: the benchmark (see `bt_plugin.tools.bench`).

`python -m bt_plugin check PATH [--kernel K] [--json]`: verify a converted model against stock.

`python -m bt_plugin doctor [--json]`: versions, the zero-code hook, flags, registered families.
"""

from __future__ import annotations

import argparse
import sys

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (imported only when asked for: it imports torch)
        from bt_plugin.tools import bench

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
        from bt_plugin.tools import check

        return check.run(args.path, args.kernel, args.json)
    if args.command == "doctor":
        from bt_plugin.tools import doctor

        return doctor.run(args.json)
    if args.command == "bench":  # reached only with options before it
        parser.error("bench takes its options after it: python -m bt_plugin bench [options]")
    from bt_plugin.tools import demo

    return demo.demo(args.model, args.repeats)
