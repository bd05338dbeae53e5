"""The wrapt wrappers on `PreTrainedModel.from_pretrained` / `_from_config`, and who is enabled.

The wrappers are installed once and check at call time whether conversion is wanted: globally
(`enable()`, `BT_PLUGIN=1`) or in the current thread / asyncio task (`with enabled():`, a
ContextVar). `disable()` removes them once no scope is active anywhere, restoring the original
classmethods exactly (`wrapt.unwrap_object`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from bt_plugin.compat import warn_unsupported_versions_once
from bt_plugin.kernels import check_kernel_name
from bt_plugin.precision import check_precision_name, check_prepack

logger = logging.getLogger("bt_plugin")
_TARGETS = ("PreTrainedModel.from_pretrained", "PreTrainedModel._from_config")

_lock = threading.RLock()
_handles: dict[str, object] = {}
_global: dict[str, object] = {"enabled": False, "kernel": "auto", "precision": "fp32", "prepack": False, "source": None}
_active_scopes = 0
_scope: ContextVar[tuple[bool, str, str, bool] | None] = ContextVar("bt_plugin_scope", default=None)
_loading: ContextVar[bool] = ContextVar("bt_plugin_loading", default=False)


def _install() -> None:
    import wrapt
    from transformers import modeling_utils

    for target in _TARGETS:
        if target not in _handles:
            _handles[target] = wrapt.wrap_function_wrapper(modeling_utils, target, _load_wrapper)


def _uninstall() -> None:
    import wrapt
    from transformers import modeling_utils

    for target, handle in list(_handles.items()):
        wrapt.unwrap_object(modeling_utils, target, handle, missing_ok=True)
        del _handles[target]


def is_patched() -> bool:
    """Whether the from_pretrained / _from_config wrappers are installed."""
    return bool(_handles)


def current_setting() -> tuple[bool, str, str, bool]:
    """`(enabled, kernel, precision, prepack)` for loads made here and now (scope first, then the global
    setting)."""
    scoped = _scope.get()
    if scoped is not None:
        return scoped
    return bool(_global["enabled"]), str(_global["kernel"]), str(_global["precision"]), bool(_global["prepack"])


def enable(*, kernel: str = "auto", precision: str = "fp32", prepack: bool = False, _source: str = "code") -> None:
    """Convert every supported model that `from_pretrained` / `from_config` returns from now on.

    Calling it again only updates the kernel, precision and prepack choice; one wrapper is ever installed.

    Args:
        kernel: `"auto"` (chosen per device) or a kernel name; unknown names raise `ValueError`.
        precision: what the converted encoder layers compute in: `"fp32"` (as loaded, the
            default), `"bf16"` (under autocast bf16, weights and outputs as loaded) or `"auto"`
            (bf16 only on a CPU with native bf16); see `bt_plugin.precision`.
        prepack: hold a second, prepacked copy of the fused layers' matrix weights (oneDNN's
            layout, CPU) for faster small calls, at the memory of those weights once more
            (reported by `explain()` and `doctor`); False (the default) holds no weight twice.
            See `bt_plugin.dispatch.derived`.

    Example:
        ```python
        >>> import bt_plugin
        >>> bt_plugin.enable()
        >>> model = AutoModel.from_pretrained(path)   # converted
        >>> bt_plugin.disable()
        ```
    """
    check_kernel_name(kernel)
    check_precision_name(precision)
    check_prepack(prepack)
    warn_unsupported_versions_once()
    with _lock:
        _install()
        _global.update(enabled=True, kernel=kernel, precision=precision, prepack=prepack, source=_source)


def disable() -> None:
    """Stop converting loads and remove the wrappers (unless an `enabled()` scope is still open).

    Models converted earlier stay converted; use `revert(model)` for those.
    """
    with _lock:
        _global.update(enabled=False, source=None)
        if _active_scopes == 0:
            _uninstall()


@contextmanager
def enabled(active: bool = True, *, kernel: str = "auto", precision: str = "fp32",
            prepack: bool = False) -> Iterator[None]:
    """Convert (or, with `active=False`, do not convert) the loads made inside the block, with
    `kernel`, `precision` and `prepack` as in `enable`.

    The setting holds for the current thread or asyncio task only; loads elsewhere follow the
    global setting, also while the block runs.

    Example:
        ```python
        >>> with bt_plugin.enabled():
        ...     model = AutoModel.from_pretrained(path)   # converted
        >>> other = AutoModel.from_pretrained(path)       # stock
        ```
    """
    global _active_scopes
    check_kernel_name(kernel)
    check_precision_name(precision)
    check_prepack(prepack)
    with _lock:
        _active_scopes += 1
        _install()
    token = _scope.set((active, kernel, precision, prepack))
    try:
        yield
    finally:
        _scope.reset(token)
        with _lock:
            _active_scopes -= 1
            if _active_scopes == 0 and not _global["enabled"]:
                _uninstall()


def _load_wrapper(wrapped, instance, args, kwargs):
    """Around from_pretrained / _from_config: pop `bt_plugin=`, load, convert the outermost load."""
    choice = kwargs.pop("bt_plugin", None)
    if choice not in (None, True, False):
        raise TypeError(f"bt_plugin= must be True, False or None, got {choice!r}")
    if _loading.get():  # a load inside a load: convert once, at the outermost
        return wrapped(*args, **kwargs)
    token = _loading.set(True)
    try:
        result = wrapped(*args, **kwargs)
    finally:
        _loading.reset(token)
    wanted, kernel, precision, prepack = current_setting()
    if choice is not None:
        wanted = choice
    if wanted:
        _convert_quietly(result[0] if isinstance(result, tuple) else result, kernel, precision, prepack)
    return result


def _convert_quietly(model, kernel: str, precision: str = "fp32", prepack: bool = False) -> None:
    """Convert a freshly loaded model; a failure leaves it stock with a warning, never an error."""
    from bt_plugin.loading.conversion import convert, revert

    try:
        convert(model, kernel=kernel, precision=precision, prepack=prepack, strict=False)
    except Exception as error:  # a load must never fail because of the plugin
        logger.warning("bt_plugin left %s stock: conversion failed: %r", type(model).__name__, error)
        revert(model)
