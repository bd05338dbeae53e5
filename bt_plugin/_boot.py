"""Interpreter start-up hook, run by `bt_plugin.pth` only when BT_PLUGIN is set.

Standard library only, never raises, safe to run twice. When the flag is on it enables the
plugin as soon as `transformers.modeling_utils` is imported (at once if it already is), so
neither wrapt nor torch is imported before the user's code imports transformers.
"""

from __future__ import annotations

import os
import sys
import warnings

FLAG = "BT_PLUGIN"
KERNEL_FLAG = "BT_PLUGIN_KERNEL"
PRECISION_FLAG = "BT_PLUGIN_PRECISION"
PREPACK_FLAG = "BT_PLUGIN_PREPACK"  # 1/true/yes/on: the prepacked weight copy (see bt_plugin.dispatch.derived)
TARGET_MODULE = "transformers.modeling_utils"
TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("", "0", "false", "no", "off")

_started = False


def parse_flag(value: str | None) -> bool | None:
    """True/False for an accepted BT_PLUGIN value (case-insensitive), None for anything else."""
    text = (value or "").strip().lower()
    if text in TRUE_VALUES:
        return True
    if text in FALSE_VALUES:
        return False
    return None


def flag_enabled(environ=os.environ) -> bool:
    """Whether BT_PLUGIN asks for the plugin; a malformed value warns once and means off."""
    value = environ.get(FLAG)
    state = parse_flag(value)
    if state is None:
        warnings.warn(
            f"bt_plugin: ignoring {FLAG}={value!r}; use one of {', '.join(TRUE_VALUES)} to enable "
            f"or one of {', '.join(v or repr(v) for v in FALSE_VALUES)} to disable (plugin stays off)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return state


def main() -> None:
    """Entry of the .pth line. Never raises: a start-up hook must not break the interpreter."""
    global _started
    try:
        if _started or not flag_enabled():
            return
        _started = True
        if TARGET_MODULE in sys.modules:
            activate()
        else:
            sys.meta_path.insert(0, _PostImportFinder())
    except Exception as error:  # pragma: no cover - defensive
        _warn_failure(error)


def activate() -> None:
    """Enable the plugin from the environment (kernel from BT_PLUGIN_KERNEL, precision from
    BT_PLUGIN_PRECISION, the prepacked copy from BT_PLUGIN_PREPACK)."""
    try:
        from bt_plugin.loading.patching import enable

        prepack = parse_flag(os.environ.get(PREPACK_FLAG))
        if prepack is None:
            raise ValueError(f"{PREPACK_FLAG}={os.environ.get(PREPACK_FLAG)!r}: use one of "
                             f"{', '.join(TRUE_VALUES)} or {', '.join(v or repr(v) for v in FALSE_VALUES)}")
        enable(kernel=os.environ.get(KERNEL_FLAG, "auto").strip() or "auto",
               precision=os.environ.get(PRECISION_FLAG, "fp32").strip().lower() or "fp32", prepack=prepack,
               _source="env")
    except Exception as error:
        _warn_failure(error)


def _warn_failure(error: BaseException) -> None:
    warnings.warn(f"bt_plugin: {FLAG} is set but the plugin could not be enabled: {error}", RuntimeWarning)


class _PostImportFinder:
    """A meta-path finder that runs `activate()` right after TARGET_MODULE has been executed."""

    _bt_plugin_finder = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding us
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ActivatingLoader(spec.loader)
                return spec
        return None


class _ActivatingLoader:
    """Delegates to the real loader; after executing the module, restores it and activates."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        activate()
