"""The transformers-version-specific facts bt_plugin depends on, in one place.

What changes between the versions bt_plugin supports (4.48 ... 5.x) and where it is handled:

- How hidden states and attentions are collected. From 4.5x to early 5.x, `check_model_inputs`
  replaces the recorded modules' `forward` for the duration of a call (`capture_wrapped`).
  transformers 5 records `output_hidden_states` /
  `output_attentions` with forward hooks that stay installed after the first call that asked for
  them; they record only when the current call's collector holds their key, so "a hook is
  installed" does not mean "this call records" (`recorded_outputs`). Encoders written before the
  recorders collect in their own loop from each layer's return value; the loop's
  `output_hidden_states` argument or the model config says whether it does (`loop_collects`).
- How a layer is called and what it returns (positional `head_mask` / `output_attentions`, tuple
  or tensor): read off each stock layer class itself, see `bt_plugin.dispatch.calls`. Arguments renamed
  between versions are listed in `ARGUMENT_RENAMES`.
- Attribute paths renamed between versions (ViT's `attention.attention.query` became
  `attention.q_proj`): the specs list the other layouts (`EncoderSpec.other_layouts`).
- How attention functions are looked up (`attention_lookup`): `get_interface` in later 5.x
  releases, `ALL_ATTENTION_FUNCTIONS[name]` before (5.0.0 included), a plain dict with no
  interface class in 4.48. `version_in` and `attention_lookup` are cached: the installed
  transformers does not change within a process, and both run on every layer call.
- Which model types exist: a family whose layer classes are missing is skipped by the registry
  with a reason (`bt_plugin.loading.registry.absent_families`).
- Masks: 4.x passes float additive masks where 5.x passes booleans; `bt_plugin.dispatch.masks` reads both.
"""

from __future__ import annotations

import types
from functools import lru_cache

_CAPTURE_HOOK_MODULE = "transformers.utils.output_capturing"

# Layer arguments that an older transformers version named differently: {name in the specs: (older names)}.
ARGUMENT_RENAMES = {"attention_mask": ("attn_mask",)}
# The name a decoder layer takes its KV cache by: `cache` (5.2x), `past_key_values` (5.0 ...),
# `past_key_value` (4.x).
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


@lru_cache(maxsize=1)
def transformers_version() -> str:
    """The installed transformers version, e.g. `'4.57.6'`."""
    import transformers

    return transformers.__version__


@lru_cache(maxsize=None)
def version_in(specifier: str) -> bool:
    """Whether the installed transformers is inside a PEP 440 specifier such as `">=5.1"`."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(specifier).contains(transformers_version(), prereleases=True)


def loop_collects(owner, kwargs: dict) -> bool:
    """Whether an encoder loop that collects outputs itself (before transformers 5's recorders)
    collects hidden states or attentions in this call: its argument, else the model config."""
    config = getattr(owner, "config", None)
    for name in ("output_hidden_states", "output_attentions"):
        value = kwargs.get(name)
        if value is None:
            value = getattr(config, name, False)
        if value:
            return True
    return False


@lru_cache(maxsize=1)
def attention_lookup() -> tuple[str | None, str | None]:
    """`(method, reason)`: the method of `transformers.modeling_utils.AttentionInterface` through
    which attention modules look up their function in this version, or why there is none."""
    import transformers.modeling_utils as modeling_utils

    interface = getattr(modeling_utils, "AttentionInterface", None)
    if interface is None:
        return None, f"transformers {transformers_version()} has no AttentionInterface to route attention through"
    if hasattr(interface, "get_interface"):
        return "get_interface", None
    return "__getitem__", None


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


def capture_wrapped(module) -> bool:
    """Whether transformers' `check_model_inputs` (4.5x - early 5.x, before the output recorders)
    has replaced this module's `forward` for the current call to record its output: a plain
    function (its wrapper copies the original's name) set on the instance. Afterwards it puts the
    bound method back on the instance, which does not count."""
    return isinstance(module.__dict__.get("forward"), types.FunctionType)


def is_transformers_capture_hook(hook) -> bool:
    """Whether a forward hook is transformers' own output recorder (inactive unless asked)."""
    return getattr(hook, "__module__", None) == _CAPTURE_HOOK_MODULE


# What CI tests (`.ci/run`): each of these transformers releases in a fresh environment, on the first
# torch of TESTED_TORCH, or on the torch of the TESTED_TORCH row that names it (`python3 .ci/matrix.py
# versions` / `elsewhere`). The newest is the newest release at the time of this bt_plugin release.
TESTED_TRANSFORMERS = ("4.48.3", "4.51.3", "4.53.3", "4.55.4", "4.57.6", "5.0.0", "5.25.0")
# The torch releases CI tests, one (torch, Python, transformers) row each. The first is the torch the
# README's commands install: the whole suite and every TESTED_TRANSFORMERS run on it. Each other row is
# a fresh environment of that Python, that torch and that transformers running the version matrix's test
# modules (`python3 .ci/matrix.py torch` lists the rows): the oldest torch on the oldest Python (there
# transformers stops at 5.20: 5.21 and later need Python 3.11), the newest torch on the newest Python
# these machines have.
TESTED_TORCH = (
    ("2.13.0", "3.11", "5.25.0"),
    ("2.6.0", "3.10", "5.0.0"),
    ("2.14.1", "3.11", "4.57.6"),
    ("2.15.0", "3.13", "5.25.0"),
)
# Outside these ranges the plugin still loads (a layer whose structure no longer matches its
# spec stays stock with a reason), but the user is told once that it is untested. torch 2.6 is the
# oldest bt_plugin runs on (scaled_dot_product_attention's enable_gqa is 2.5's, transformers 5.20 and
# later need 2.6); local build labels (`2.14.1+cu130`, `2.13.0+cpu`) count as their release.
SUPPORTED_VERSIONS = {"torch": ">=2.6,<2.16", "transformers": ">=4.48,<6"}
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
                f"bt_plugin is tested with {package}{spec}, found {installed} (untested): layers whose "
                "structure does not match a spec stay stock (see bt_plugin.explain)"
            )
    return lines


def warn_unsupported_versions_once() -> None:
    """Log each out-of-range version once per process (called when the plugin is enabled or used)."""
    import logging

    for line in version_warnings():
        if line not in _warned:
            _warned.add(line)
            logging.getLogger("bt_plugin").warning(line)
