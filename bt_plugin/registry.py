"""Architecture specs, discovered once through the entry-point group `bt_plugin.patches`.

Built-in families are declared in bt_plugin's own package metadata; a third-party distribution
adds one by declaring an entry point in the same group that points at an `EncoderSpec` (or a
list of them). A broken entry point is skipped with one warning; the rest keeps working.
"""

from __future__ import annotations

import threading
import warnings

from bt_plugin.spec import EncoderSpec

ENTRY_POINT_GROUP = "bt_plugin.patches"

_lock = threading.Lock()
_specs: dict[str, EncoderSpec] | None = None


def _load_entry_point(entry_point) -> list[EncoderSpec]:
    loaded = entry_point.load()
    items = loaded if isinstance(loaded, (list, tuple)) else [loaded]
    bad = [item for item in items if not isinstance(item, EncoderSpec)]
    if bad:
        raise TypeError(f"it gave {bad[0]!r}, not a bt_plugin.spec.EncoderSpec")
    return list(items)


def _discover() -> dict[str, EncoderSpec]:
    import importlib_metadata

    specs: dict[str, EncoderSpec] = {}
    for entry_point in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found = _load_entry_point(entry_point)
        except Exception as error:  # a third-party plugin must not break the others
            warnings.warn(
                f"bt_plugin: skipping entry point {entry_point.name!r} ({entry_point.value}) "
                f"in group {ENTRY_POINT_GROUP!r}: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        for spec in found:
            specs.setdefault(spec.name, spec)
    return specs


def all_specs() -> dict[str, EncoderSpec]:
    """Every registered spec by family name (entry points are read once, lazily)."""
    global _specs
    if _specs is None:
        with _lock:
            if _specs is None:
                _specs = _discover()
    return _specs


def reload() -> dict[str, EncoderSpec]:
    """Read the entry points again (after installing a plugin distribution at run time)."""
    global _specs
    with _lock:
        _specs = None
    return all_specs()


def specs_for_model_type(model_type: str) -> list[EncoderSpec]:
    """Every spec serving `config.model_type`, in registration order (a family may register
    variants told apart by their config checks, e.g. post- and pre-layer-norm)."""
    return [spec for spec in all_specs().values() if model_type in spec.model_types]


def spec_for_model_type(model_type: str) -> EncoderSpec | None:
    """The first spec serving `config.model_type`, or None."""
    specs = specs_for_model_type(model_type)
    return specs[0] if specs else None


def spec_for_config(config) -> tuple[EncoderSpec | None, str | None]:
    """`(spec, reason)`: the first spec for the config's model type whose config checks pass;
    when all refuse, the first one with its reason; `(None, None)` when none is registered."""
    first = None
    for spec in specs_for_model_type(getattr(config, "model_type", None)):
        reason = spec.config_reason(config)
        if reason is None:
            return spec, None
        first = first or (spec, reason)
    return first or (None, None)


def supported_model_types() -> list[str]:
    """Sorted model types served by the registered specs."""
    return sorted({t for spec in all_specs().values() for t in spec.model_types})
