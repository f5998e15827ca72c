"""Flow-matching loss of the generation heads (modality translation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from models.generation import FlowOutput


def flow_matching_loss(fo: FlowOutput) -> torch.Tensor:
    """Conditional flow matching: weighted MSE between predicted and target velocities.

    Args:
        fo: ``pred``/``target``/``weight`` ``(R, *shape)`` and ``valid`` ``(R,)`` rows.

    Returns:
        Scalar: the mean squared error over the weighted elements of valid rows; a zero
        attached to ``pred`` when no row is valid (every worker keeps the same graph).
    """
    w = fo.weight * fo.valid.to(fo.weight.dtype).view(-1, *([1] * (fo.weight.dim() - 1)))
    err = (fo.pred.float() - fo.target.float()).pow(2) * w
    # No host sync: with nothing valid the numerator is an exact zero still on the graph.
    return err.sum() / w.sum().clamp_min(1.0)
