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


def _assigned(module, name, submodule):
    global _count
    _count += 1
    return None  # the assigned module is kept as it is


def current() -> int:
    """The count now (compare two readings: equal means no submodule was assigned in between)."""
    return _count


# counting starts when this module is first imported (Python imports a module once per process)
_module.register_module_module_registration_hook(_assigned)
