"""Architecture specs: the built-in families, then third-party ones from entry points, read once.

The built-in families are listed in `bt_plugin.patches.BUILTIN_FAMILIES` and imported from the
running copy of bt_plugin itself, never through package metadata: a checkout that shadows an
installed copy (or an installed copy of another version) must not change which built-ins exist.
A third-party distribution adds a family by declaring an entry point in the group
`bt_plugin.patches` that points at an `EncoderSpec` (or a list of them). A broken entry point is
skipped with one warning; the rest keeps working.

A family none of whose layer modules exist in the running transformers version (ModernBERT
before 4.48, EuroBERT before 5.x) is skipped, with the reason `explain()` and `doctor` show
(`absent_families`); it never raises.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings

from bt_plugin.spec import EncoderSpec

ENTRY_POINT_GROUP = "bt_plugin.patches"
BUILTIN_PACKAGE = "bt_plugin.patches"

_lock = threading.Lock()
_specs: dict[str, EncoderSpec] | None = None
_absent: dict[str, tuple[EncoderSpec, str]] = {}


def _as_specs(loaded) -> list[EncoderSpec]:
    items = loaded if isinstance(loaded, (list, tuple)) else [loaded]
    bad = [item for item in items if not isinstance(item, EncoderSpec)]
    if bad:
        raise TypeError(f"it gave {bad[0]!r}, not a bt_plugin.spec.EncoderSpec")
    return list(items)


def _load_entry_point(entry_point) -> list[EncoderSpec]:
    return _as_specs(entry_point.load())


def builtin_specs() -> list[EncoderSpec]:
    """The specs of the built-in families, imported from this copy's `bt_plugin.patches`."""
    from bt_plugin.patches import BUILTIN_FAMILIES

    specs = []
    for family in BUILTIN_FAMILIES:
        module = importlib.import_module(f"{BUILTIN_PACKAGE}.{family}")
        specs.extend(_as_specs(getattr(module, "SPECS", None) or module.SPEC))
    return specs


def third_party_entry_points() -> list:
    """Entry points of the group, minus any that name a built-in module (an installed copy's
    metadata from an earlier release did; the running copy's own list is what counts)."""
    import importlib_metadata

    return [
        entry_point for entry_point in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        if not entry_point.value.startswith(f"{BUILTIN_PACKAGE}.")
    ]


def absent_reason(spec: EncoderSpec) -> str | None:
    """Why the running transformers cannot have this family's layers (none of their modules
    exists, or the spec describes other versions' layers), or None. Looks modules up without
    importing them."""
    from bt_plugin.compat import transformers_version, version_in

    if spec.transformers and not version_in(spec.transformers):
        return (f"the {spec.name} spec describes the layers of transformers{spec.transformers}, "
                f"not those of {transformers_version()}")
    modules = dict.fromkeys(dotted.rpartition(".")[0] for dotted in spec.layer_classes)
    for module in modules:
        try:
            if importlib.util.find_spec(module) is not None:
                return None
        except (ImportError, ValueError):  # a missing parent package
            continue
    names = ", ".join(dotted.rpartition(".")[2] for dotted in spec.layer_classes)
    return f"transformers {transformers_version()} has no {names} (the {spec.name} family needs another version)"


def _present(specs: dict[str, EncoderSpec]) -> dict[str, EncoderSpec]:
    present = {}
    for name, spec in specs.items():
        reason = absent_reason(spec)
        if reason:
            _absent[name] = (spec, reason)
        else:
            present[name] = spec
    return present


def absent_families() -> dict[str, str]:
    """`{family: reason}` for the registered families this transformers version does not have."""
    all_specs()
    return {name: reason for name, (_, reason) in _absent.items()}


def absent_reason_for_model_type(model_type: str) -> str | None:
    """The reason of an absent family serving `model_type` (e.g. a remote-code model), or None."""
    all_specs()
    return next((reason for spec, reason in _absent.values() if model_type in spec.model_types), None)


def _discover() -> dict[str, EncoderSpec]:
    specs: dict[str, EncoderSpec] = {spec.name: spec for spec in builtin_specs()}
    for entry_point in third_party_entry_points():
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
    """Every registered spec present in this transformers version, by family name (entry points
    are read once, lazily; absent families are in `absent_families`)."""
    global _specs
    if _specs is None:
        with _lock:
            if _specs is None:
                _absent.clear()
                _specs = _present(_discover())
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
