"""Classification loss over a subset of rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over the selected rows (fused or single-modality classifier).

    Args:
        logits: ``(B, C)`` class logits.
        labels: ``(B,)`` int class ids.
        rows: ``(B,)`` bool rows to score (callers exclude unknown labels and rows lacking
            the modality).

    Returns:
        Scalar mean over ``rows``; a zero attached to ``logits`` when there is none.
    """
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows].float(), labels[rows].long())
