"""The transformers-version-specific facts bt_plugin depends on, in one place.

transformers 5 records `output_hidden_states` / `output_attentions` with forward hooks that stay
installed after the first call that asked for them; they record only when the current call's
collector holds their key. So "a hook is installed" does not mean "this call records".
"""

from __future__ import annotations

_CAPTURE_HOOK_MODULE = "transformers.utils.output_capturing"


def recorded_outputs() -> frozenset[str]:
    """Keys ('hidden_states', 'attentions', ...) the current forward call is recording."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers return outputs without a collector
        return frozenset()
    collected = _active_collector.get()
    if not collected:
        return frozenset()
    return frozenset(key for key in collected if not key.startswith("_"))


def is_transformers_capture_hook(hook) -> bool:
    """Whether a forward hook is transformers' own output recorder (inactive unless asked)."""
    return getattr(hook, "__module__", None) == _CAPTURE_HOOK_MODULE


# The ranges this release is tested against. Outside them the plugin still loads: any layer whose
# structure no longer matches its spec stays stock with a reason, but the user is told once.
SUPPORTED_VERSIONS = {"torch": ">=2.4", "transformers": ">=5.0,<6"}
_warned: set[str] = set()


def version_warnings() -> list[str]:
    """One line per installed package outside SUPPORTED_VERSIONS (empty when all are inside)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet

    lines = []
    for package, spec in SUPPORTED_VERSIONS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        if not SpecifierSet(spec).contains(installed, prereleases=True):
            lines.append(
                f"bt_plugin is tested with {package}{spec}, found {installed}: layers whose structure "
                "does not match a spec stay stock (see bt_plugin.explain)"
            )
    return lines


def warn_unsupported_versions_once() -> None:
    """Log each out-of-range version once per process (called when the plugin is enabled or used)."""
    import logging

    for line in version_warnings():
        if line not in _warned:
            _warned.add(line)
            logging.getLogger("bt_plugin").warning(line)
