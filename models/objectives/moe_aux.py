"""MoE auxiliary losses: load balancing and router z-loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from models.model import OmniOutput
from models.objectives.base import Objective, zero_loss


class MoEAuxLoss(Objective):
    """``loss = aux_weight * moe_aux + z_weight * moe_z`` (``out.aux``).

    Args:
        aux_weight: Balance-loss weight (``OmniConfig.aux_loss_weight``).
        z_weight: z-loss weight (``OmniConfig.z_loss_weight``).
    """

    name = "moe"
    batch_keys = ()

    def __init__(self, aux_weight: float = 0.01, z_weight: float = 0.001) -> None:
        super().__init__(1.0)
        self.aux_weight = aux_weight
        self.z_weight = z_weight

    def forward(self, out: OmniOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if not out.aux:
            z = zero_loss(out)
            return {"loss": z, "moe_aux": z.detach(), "moe_z": z.detach()}
        aux, zl = out.aux["moe_aux"], out.aux["moe_z"]
        return {
            "loss": self.aux_weight * aux + self.z_weight * zl,
            "moe_aux": aux.detach(),
            "moe_z": zl.detach(),
        }
