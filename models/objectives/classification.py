"""Classification loss over a subset of rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy over the selected rows (fused or single-modality classifier).

    Args:
        logits: ``(B, C)`` class logits.
        labels: ``(B,)`` int class ids.
        rows: ``(B,)`` bool rows to score (callers exclude unknown labels and rows lacking
            the modality).
        weight: Optional ``(C,)`` class weights: the loss is then the weighted mean
            ``sum_i w[y_i] * ce_i / sum_i w[y_i]`` over ``rows`` (PyTorch's ``weight=``).
        label_smoothing: PyTorch's ``label_smoothing`` (0 = plain cross-entropy).

    Returns:
        Scalar mean over ``rows``; a zero attached to ``logits`` when there is none.
    """
    if not bool(rows.any()):
        return logits.sum() * 0.0
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(
        logits[rows].float(), labels[rows].long(), weight=weight, label_smoothing=label_smoothing
    )
