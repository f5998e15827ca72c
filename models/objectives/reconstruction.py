"""Masked reconstruction (unimodal masked modelling and cross-modal reconstruction)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from models.model import OmniOutput
from models.objectives.base import Objective


def chamfer_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Symmetric squared-L2 Chamfer distance.

    Args:
        pred, target: ``(n, K, 3)`` point sets.

    Returns:
        Scalar mean over the ``n`` sets.
    """
    d = torch.cdist(pred, target).pow(2)  # (n, K, K)
    return d.min(2).values.mean() + d.min(1).values.mean()


class MaskedReconstructionLoss(Objective):
    """Reconstructs masked tokens: cross-entropy for text ids, MSE for patches
    (per-patch normalized targets, as MAE's ``norm_pix_loss``), Chamfer for point groups.

    Args:
        mask_ratio: Passed to the model forward (``model_kwargs``).
        cross_modal: Masked tokens may attend to the other modalities present
            (``recon_cross``); False = unimodal masked modelling.
        norm_targets: Normalize each target patch to zero mean / unit variance.
        weight: Loss weight.
    """

    name = "recon"
    batch_keys = ("{m}", "{m}_mask", "{m}_present")

    def __init__(
        self,
        mask_ratio: float | dict[str, float] = 0.5,
        *,
        cross_modal: bool = False,
        norm_targets: bool = True,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        self.norm_targets = norm_targets
        self.model_kwargs = {"mask_ratio": mask_ratio, "recon_cross": cross_modal}

    def modality_loss(self, r) -> torch.Tensor | None:
        sel = r.mask  # (B, N)
        if not bool(sel.any()):
            return None
        pred = r.pred[sel]  # (n, P)
        target = r.target[sel]
        if r.kind == "tokens":
            return F.cross_entropy(pred.float(), target)
        target = target.float()
        if r.kind == "points":
            return chamfer_distance(
                pred.float().view(pred.shape[0], -1, 3), target.view(target.shape[0], -1, 3)
            )
        if self.norm_targets:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True, unbiased=False)
            target = (target - mean) / (var + 1e-6).sqrt()
        return F.mse_loss(pred.float(), target)

    def forward(self, out: OmniOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        parts = {}
        for m, r in out.recon.items():
            loss = self.modality_loss(r)
            if loss is not None:
                parts[f"recon_{m}"] = loss
        return self._result(out, parts)
