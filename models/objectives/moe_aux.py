"""MoE auxiliary losses: load balancing and router z-loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def moe_aux_terms(
    aux: Mapping[str, torch.Tensor], aux_weight: float, z_weight: float
) -> dict[str, torch.Tensor]:
    """Weighted MoE terms of a forward's ``OmniOutput.aux``.

    Args:
        aux: ``{"moe_aux": balance loss, "moe_z": router z-loss}`` scalars (empty when the
            model has no MoE layer).
        aux_weight: Balance-loss weight (``OmniConfig.aux_loss_weight``).
        z_weight: z-loss weight (``OmniConfig.z_loss_weight``).

    Returns:
        ``{"moe_aux": aux_weight * moe_aux, "moe_z": z_weight * moe_z}``, or ``{}``.
    """
    if not aux:
        return {}
    return {"moe_aux": aux_weight * aux["moe_aux"], "moe_z": z_weight * aux["moe_z"]}
