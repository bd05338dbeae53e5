"""Turn the attention mask that transformers passes to an encoder layer into a key-padding mask.

transformers 5 passes `None` (no padding), a 4-D `(B, 1, Q, K)` boolean mask (sdpa; True =
attend), a 4-D float additive mask (eager; 0 = attend, a large negative value = masked), or a
`(B, 1, 1, K)` float mask (LayoutLM-style). A mask is only usable when it is a pure key-padding
mask: the same for every query row. Anything else gives a reason and the stock layer runs.
"""

from __future__ import annotations

import torch

# An additive mask entry at or below this is "masked": exp() of it underflows to 0 in fp16/fp32.
_MASKED_AT_OR_BELOW = -1.0e4


def key_padding_mask(mask, batch: int, length: int) -> tuple[torch.Tensor | None, str | None]:
    """Return `(keep, reason)`: `keep` is a `(B, L)` bool tensor, True for real tokens.

    `keep` is None when nothing is padded. `reason` is None when the mask is a key-padding mask.
    """
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        return None, f"attention mask was a {type(mask).__name__}, not a tensor"
    if mask.dim() == 2:
        rows = mask
    elif mask.dim() == 4 and mask.shape[1] == 1:
        rows, reason = _one_row_per_batch(mask)
        if reason:
            return None, reason
    else:
        return None, f"attention mask had shape {tuple(mask.shape)} (expected (B, 1, Q, K) or (B, K))"
    if tuple(rows.shape) != (batch, length):
        return None, f"attention mask covered {tuple(rows.shape)}, hidden states were ({batch}, {length})"
    keep, reason = _as_keep(rows)
    if reason:
        return None, reason
    if bool(keep.all()):
        return None, None
    return keep, None


def _one_row_per_batch(mask: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """The `(B, K)` row of a 4-D mask, or a reason when query rows differ (causal, custom)."""
    if mask.shape[2] != 1 and not bool((mask == mask[:, :, :1, :]).all()):
        return None, "attention mask differed between query rows (not a key-padding mask)"
    return mask[:, 0, 0, :], None


def _as_keep(rows: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    if rows.dtype == torch.bool:
        return rows, None
    if rows.is_floating_point():
        masked = rows <= _MASKED_AT_OR_BELOW
        if not bool(((rows == 0) | masked).all()):
            return None, "attention mask had values other than 0 and a large negative number (a bias, not padding)"
        return ~masked, None
    if not bool(((rows == 0) | (rows == 1)).all()):
        return None, "integer attention mask had values other than 0 and 1"
    return rows.bool(), None


def padding_reason(keep: torch.Tensor, *, right_padded_only: bool, needs_a_real_token: bool = False) -> str | None:
    """Reasons a kernel cannot use `keep`: for a kernel that runs the layer's own code on the
    real tokens (`needs_a_real_token`), no real token in the whole batch (its modules cannot
    take zero tokens; stock's output there is all padding); for a right-padding-only kernel
    (fastpath) a row without real tokens, or padding on the left or in gaps. The packed kernel
    takes any key-padding mask."""
    if needs_a_real_token and not bool(keep.any()):
        return "no row of the attention mask had a real token (nothing to compute padding-free)"
    if not right_padded_only:
        return None
    if bool((keep.sum(dim=1) == 0).any()):
        return "a row of the attention mask had no real token (fastpath needs one per row)"
    if right_padded_only and bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        return "attention mask was not right-padded (left padding or gaps; fastpath needs right padding)"
    return None
