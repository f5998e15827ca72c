"""Training objectives (no training loop here): each is an ``nn.Module`` declaring
``batch_keys`` and ``model_kwargs`` and returning ``{"loss": weighted tensor, <name>:
detached components...}``. Combine with :class:`CompositeObjective`; see
:func:`stage_objective` for the three training stages."""

from __future__ import annotations

from models.objectives.base import CompositeObjective, Objective
from models.objectives.captioning import CaptioningLoss
from models.objectives.classification import ClassificationLoss
from models.objectives.contrastive import ContrastiveLoss, all_gather_with_grad
from models.objectives.moe_aux import MoEAuxLoss
from models.objectives.reconstruction import MaskedReconstructionLoss, chamfer_distance


def stage_objective(
    stage: str,
    *,
    aux_weight: float = 0.01,
    z_weight: float = 0.001,
    gather_fn=None,
    use_labels: bool = False,
    mask_ratio: float = 0.5,
    max_logit_scale: float = 100.0,
) -> CompositeObjective:
    """Default objective mix of a training stage.

    * ``pretrain``: unimodal masked modelling + MoE aux.
    * ``align``: InfoNCE over all present pairs + cross-modal masked reconstruction +
      modality -> text captioning + MoE aux. (Masking applies to the same forward, so the
      contrastive term sees masked inputs, as in FLIP.)
    * ``finetune``: classification (fused and per modality) + InfoNCE (retrieval) +
      captioning (description) + MoE aux.
    """
    moe = MoEAuxLoss(aux_weight, z_weight)
    contrastive = ContrastiveLoss(
        gather_fn=gather_fn, use_labels=use_labels, max_logit_scale=max_logit_scale
    )
    if stage == "pretrain":
        return CompositeObjective([MaskedReconstructionLoss(mask_ratio, cross_modal=False), moe])
    if stage == "align":
        return CompositeObjective(
            [
                contrastive,
                MaskedReconstructionLoss(mask_ratio, cross_modal=True, weight=0.5),
                CaptioningLoss(weight=0.5),
                moe,
            ]
        )
    if stage == "finetune":
        return CompositeObjective(
            [ClassificationLoss(), contrastive, CaptioningLoss(weight=0.5), moe]
        )
    raise ValueError(f"unknown stage {stage!r}; expected pretrain, align or finetune")


__all__ = [
    "CaptioningLoss",
    "ClassificationLoss",
    "CompositeObjective",
    "ContrastiveLoss",
    "MaskedReconstructionLoss",
    "MoEAuxLoss",
    "Objective",
    "all_gather_with_grad",
    "chamfer_distance",
    "stage_objective",
]
