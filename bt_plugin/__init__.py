"""bt_plugin: Hugging Face transformers encoders on fused, padding-free kernels at inference.

Zero code: `BT_PLUGIN=1 python app.py`. One line: `bt_plugin.enable()`. Scoped:
`with bt_plugin.enabled(): ...`. Explicit: `bt_plugin.convert(model)` / `bt_plugin.revert(model)`,
and `bt_plugin.explain(model)` says what runs fused and why not.

Importing this package is cheap: torch, transformers and wrapt are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "enable": "bt_plugin.patching",
    "disable": "bt_plugin.patching",
    "enabled": "bt_plugin.patching",
    "convert": "bt_plugin.conversion",
    "revert": "bt_plugin.conversion",
    "is_converted": "bt_plugin.conversion",
    "explain": "bt_plugin.report",
    "EncoderSpec": "bt_plugin.spec",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from bt_plugin.conversion import convert, is_converted, revert
    from bt_plugin.report import explain
    from bt_plugin.patching import disable, enable, enabled
    from bt_plugin.spec import EncoderSpec


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bt_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
