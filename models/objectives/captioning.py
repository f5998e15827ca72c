"""Modality -> text captioning loss (teacher-forced next-token cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    *,
    pad_id: int = 0,
) -> torch.Tensor:
    """Cross-entropy of next-token ``logits`` against ``ids[:, 1:]`` over real tokens.

    Args:
        logits: ``(B, L-1, V)`` decoder logits given the modality and ``ids[:, :-1]``.
        ids: ``(B, L)`` token ids of the caption (BOS first).
        rows: ``(B,)`` bool rows having both the modality and a caption.
        text_mask: ``(B, L)`` bool real tokens; None: ``ids != pad_id``.
        pad_id: Padding id (used only without ``text_mask``).

    Returns:
        Scalar mean over the scored tokens; a zero attached to ``logits`` when none.
    """
    target = ids.long()[:, 1:]  # (B, L-1)
    mask = (target != pad_id) if text_mask is None else text_mask.bool()[:, 1:]
    mask = mask & rows.bool()[:, None]
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), target[mask])
