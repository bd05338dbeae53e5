"""bt_plugin: Hugging Face transformers encoders on fused, padding-free kernels at inference.

Zero code: `BT_PLUGIN=1 python app.py`. One line: `bt_plugin.enable()`. Scoped:
`with bt_plugin.enabled(): ...`. Explicit: `bt_plugin.convert(model)` / `bt_plugin.revert(model)`,
and `bt_plugin.explain(model)` says what runs fused and why not.

Importing this package is cheap: torch, transformers and wrapt are imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"


def _alias_checkout_patches() -> None:
    # In a source checkout the built-in specs are the top-level `patches/` folder, which installs
    # as `bt_plugin.patches`. When this copy of bt_plugin is a checkout (started from the clone's
    # root, it shadows any installed copy), register that folder under its installed name, so
    # the checkout behaves exactly like a wheel or editable install.
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "patches", "__init__.py")
    if "bt_plugin.patches" in sys.modules or os.path.isdir(os.path.join(here, "patches")):
        return
    if not os.path.isfile(source):
        return
    spec = importlib.util.spec_from_file_location(
        "bt_plugin.patches", source, submodule_search_locations=[os.path.dirname(source)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bt_plugin.patches"] = module
    spec.loader.exec_module(module)
    globals()["patches"] = module  # what `import bt_plugin.patches` would bind on the parent


_alias_checkout_patches()

_EXPORTS = {
    "enable": "bt_plugin.loading.patching",
    "disable": "bt_plugin.loading.patching",
    "enabled": "bt_plugin.loading.patching",
    "convert": "bt_plugin.loading.conversion",
    "revert": "bt_plugin.loading.conversion",
    "is_converted": "bt_plugin.loading.conversion",
    "explain": "bt_plugin.loading.report",
    "EncoderSpec": "bt_plugin.spec",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from bt_plugin.loading.conversion import convert, is_converted, revert
    from bt_plugin.loading.report import explain
    from bt_plugin.loading.patching import disable, enable, enabled
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
