"""Print one of the README's shell commands, so CI runs exactly what the README tells a reader.

`quickstart`: the first ```bash block of the "## Quick start" section; `tests`: its second;
`server-install` and `server`: the first and second of the "## Servers" section of
docs/integrations.md.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHICH = {"quickstart": ("README.md", "Quick start", 0), "tests": ("README.md", "Quick start", 1),
         "server-install": ("docs/integrations.md", "Servers", 0), "server": ("docs/integrations.md", "Servers", 1)}


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def main(which: str) -> None:
    page, heading, index = WHICH[which]
    blocks = re.findall(r"```bash\n(.*?)```", section((ROOT / page).read_text(), heading), flags=re.S)
    command = blocks[index].strip()
    assert "\n" not in command, f"the {page} {which} command should be one line: {command!r}"
    print(command)


if __name__ == "__main__":
    main(sys.argv[1])
