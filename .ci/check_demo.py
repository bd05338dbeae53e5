"""Fail unless a demo log (`python -m bt_plugin`, maybe after pip's output) shows what the README
promises: every encoder layer fused, the difference to stock within 1e-5, a speed-up, no warning."""

import re
import sys
from pathlib import Path

log = Path(sys.argv[1]).read_text()
problems = []
if not re.search(r"^fused: (\d+)/\1 encoder layers ran fused on every call \(ok\)$", log, flags=re.M):
    problems.append("not every encoder layer ran fused")
converted = re.search(r"^\w+: (\d+)/(\d+) encoder layers converted", log, flags=re.M)
if not converted or converted.group(1) != converted.group(2) or converted.group(1) == "0":
    problems.append(f"not every encoder layer was converted ({converted.group(0) if converted else 'no report'})")
if not re.search(r"^max abs difference to stock on real tokens: \S+ \(ok at 1e-5\)$", log, flags=re.M):
    problems.append("the difference to stock was not within 1e-5")
speedup = re.search(r"speed-up: ([0-9.]+)x", log)
if not speedup:
    problems.append("no speed-up was printed")
warnings = sorted(set(re.findall(r"\b\w*Warning\b.*", log)))  # Python warnings (pip's say "WARNING:")
if warnings:
    problems.append(f"warnings were printed: {warnings}")
if problems:
    sys.exit(f"demo check FAILED ({sys.argv[1]}): " + "; ".join(problems))
print(f"demo check passed: every layer fused, within 1e-5, speed-up {speedup.group(1)}x, no warning")
