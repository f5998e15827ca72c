"""What a forward of :class:`~models.model.OmniModel` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from models.trunk import TrunkStats


@dataclass
class ModalityFeatures:
    """One modality's features after encoder, trunk and adapter.

    Attributes:
        tokens: ``(B, N, d)``.
        mask: ``(B, N)`` bool, True = valid token (False for rows lacking the modality).
        pooled: ``(B, d)`` masked mean of ``tokens``.
        embed: ``(B, E)`` L2-normalized projection into the shared space.
        present: ``(B,)`` bool, rows that have this modality.
        masked: ``(B, N)`` bool tokens replaced by ``[MASK]`` (only with ``mask_ratio``).
        targets: Reconstruction targets of the tokens (only with ``mask_ratio``).
        stats: Routing statistics of the trunk pass.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    embed: torch.Tensor
    present: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    stats: TrunkStats | None = None


@dataclass
class ReconOutput:
    """Masked-modelling predictions of one modality.

    Attributes:
        pred: ``(B, N, P)`` predictions (logits over the vocabulary for text).
        target: ``(B, N, P)`` float targets, or ``(B, N)`` int64 ids for text.
        mask: ``(B, N)`` bool, positions to score (masked, valid, row present).
        kind: ``tokens`` (cross-entropy), ``patches`` (MSE) or ``points`` (Chamfer).
        cross: Whether other modalities were used as context.
    """

    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    kind: str
    cross: bool = False


@dataclass
class OmniOutput:
    """Everything one forward produces (fields are empty when not requested)."""

    embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, ModalityFeatures] = field(default_factory=dict)
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    fused: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    fusion_modalities: list[str] = field(default_factory=list)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_load: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, torch.Tensor] = field(default_factory=dict)
    logit_scale: torch.Tensor | None = None
    recon: dict[str, ReconOutput] = field(default_factory=dict)
    caption_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    modality_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``{target: models.generation.FlowOutput}`` (the ``generate`` part).
    flow: dict[str, Any] = field(default_factory=dict)
