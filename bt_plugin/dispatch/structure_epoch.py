"""A process-wide count of submodule assignments, so a per-layer verdict that depends only on
which modules a layer holds can be cached and re-checked with one integer comparison.

Every `module.name = submodule` (and `add_module`, `register_module`, `ModuleList`/`ModuleDict`
edits: what adapters, quantizers and `merge_and_unload` do) runs torch's global module
registration hooks; the hook installed here counts them. A verdict recorded at one count holds
while the count is unchanged. The hook is one integer increment per assignment (model
construction makes a few thousand).

Only verdicts that stay *exact* when stale use it: which layers run their own stock code. Hooks,
replaced `forward`s and parameter storage are not module assignments; what depends on them is
checked by `structure_stamp` on every call.
"""

from __future__ import annotations

from torch.nn.modules import module as _module

_count = 0
_moved_whole: tuple[type, ...] = ()


def moves_nothing(cls: type) -> None:
    """Do not count assignments of a `cls` instance itself: `cls` is a converted layer, whose
    verdict reads what it holds, and a layer placed into a list holds what it held. Decoder-style
    models slice their layer list on every call (`self.layers[:n]` builds a new `ModuleList`:
    one assignment per layer), which would otherwise void every verdict on every call. Converted
    layers never hold one another."""
    global _moved_whole
    _moved_whole += (cls,)


def _assigned(module, name, submodule):
    global _count
    if not isinstance(submodule, _moved_whole):
        _count += 1
    return None  # the assigned module is kept as it is


def current() -> int:
    """The count now (compare two readings: equal means no submodule was assigned in between)."""
    return _count


# counting starts when this module is first imported (Python imports a module once per process)
_module.register_module_module_registration_hook(_assigned)
