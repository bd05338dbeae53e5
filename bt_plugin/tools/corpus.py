"""Real English prose that is available offline: paragraphs of the Python standard library's docstrings.

The benchmark needs realistic variable-length text without downloading a data set. Every Python
installation ships thousands of paragraphs of hand-written English in its docstrings: short ones
("Return the number of items in a container.") and long explanatory ones, which is what the
padded batches of a real text workload look like.

`paragraphs()` reads the docstrings of a fixed list of standard-library modules and of their
public classes, methods and functions (`inspect.getdoc`), splits them at blank lines, keeps the
paragraphs that read as prose (`is_prose`: at least `MIN_WORDS` words, mostly letters, a sentence
that starts with a capital and ends with `.`, `!` or `?`, no doctest, no indented code, no
reStructuredText blocks) and drops duplicates. The docstrings are read in a fresh interpreter
(`python -I -S`, the standard library alone): in this process, packages imported earlier may have
replaced standard-library functions (Ray replaces `inspect.isgenerator`), which would make the
corpus depend on what happened to be imported. The order is deterministic for a given Python
version; `sample(count, seed)` draws a seeded, shuffled selection.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import json
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

# Plain, widely installed modules without import side effects (no GUI, no `this`/`antigravity`).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "builtins", "calendar",
    "cmd", "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "email.message", "enum",
    "filecmp", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookiejar", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "numbers",
    "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "poplib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zlib",
)

MIN_WORDS = 8
MIN_LETTER_SHARE = 0.8  # of the non-space characters
_CODE_MARKERS = (">>>", "::", "...", "=", "{", "}", "[", "]", "<", ">", "|", "\\", "`", "#", "$", "%", "@", "~", "^")


def is_prose(paragraph: str) -> bool:
    """Whether a docstring paragraph reads as English prose (not code, a list, a table or a signature)."""
    lines = paragraph.splitlines()
    if not lines or any(line[:1].isspace() or line.lstrip()[:1] in "-*+:" for line in lines):
        return False  # indented code/continuations, bullet lists, field lists
    text = " ".join(line.strip() for line in lines)
    if any(marker in text for marker in _CODE_MARKERS):
        return False
    if len(text.split()) < MIN_WORDS or not text[0].isupper() or text[-1] not in ".!?":
        return False
    visible = [char for char in text if not char.isspace()]
    return sum(char.isalpha() for char in visible) >= MIN_LETTER_SHARE * len(visible)


@functools.lru_cache(maxsize=4)
def paragraphs(modules: tuple[str, ...] = STDLIB_MODULES) -> tuple[str, ...]:
    """All distinct prose paragraphs of the modules' docstrings, in a deterministic order, read in
    a fresh interpreter. A module that cannot be imported on this system is skipped."""
    done = subprocess.run([sys.executable, "-I", "-S", __file__, *modules], capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout))


def read_paragraphs(modules: tuple[str, ...]) -> tuple[str, ...]:
    """`paragraphs`, read in this interpreter (as it is: what its imports changed included)."""
    seen: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # e.g. reading typing.io's docstring
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for doc in _docstrings(module):
                for paragraph in _split_paragraphs(doc):
                    seen.setdefault(paragraph, None)
    return tuple(seen)


def sample(count: int, seed: int = 0, modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """`count` distinct paragraphs in a seeded random order (the same for the same seed)."""
    pool = paragraphs(modules)
    if count > len(pool):
        raise ValueError(f"asked for {count} paragraphs, the corpus has {len(pool)}")
    return random.Random(seed).sample(pool, count)


def _docstrings(module: ModuleType) -> Iterator[str]:
    """The module's docstring, then those of its public classes (and their methods) and functions."""
    yield inspect.getdoc(module) or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and inspect.isroutine(member):
                    yield inspect.getdoc(member) or ""


def _split_paragraphs(doc: str) -> Iterator[str]:
    """Blank-line separated prose paragraphs, each joined onto one line with single spaces."""
    for block in re.split(r"\n[ \t]*\n", doc):
        if is_prose(block):
            yield " ".join(block.split())


if __name__ == "__main__":  # paragraphs() runs this file in a fresh interpreter
    print(json.dumps(read_paragraphs(tuple(sys.argv[1:]))))
