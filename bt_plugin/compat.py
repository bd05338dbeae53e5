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
