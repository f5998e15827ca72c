"""Classification on the fused embedding and on single-modality embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from models.model import OmniOutput
from models.objectives.base import Objective, present_of


class ClassificationLoss(Objective):
    """Cross-entropy on ``out.logits`` (fused) and ``out.modality_logits[m]``.

    Rows with ``label == -100`` are ignored, as are rows lacking the modality.

    Args:
        fused: Include the fused-embedding classifier.
        per_modality: Include every single-modality classifier.
        label_smoothing: Cross-entropy label smoothing.
        weight: Loss weight.
    """

    name = "classification"
    batch_keys = ("label", "{m}_present")

    def __init__(
        self,
        *,
        fused: bool = True,
        per_modality: bool = True,
        label_smoothing: float = 0.0,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        self.fused = fused
        self.per_modality = per_modality
        self.label_smoothing = label_smoothing

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor):
        sel = rows & (labels >= 0)
        if not bool(sel.any()):
            return None
        return F.cross_entropy(
            logits[sel].float(), labels[sel], label_smoothing=self.label_smoothing
        )

    def forward(self, out: OmniOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["label"].long()
        parts = {}
        if self.fused and out.logits is not None:
            rows = torch.zeros_like(labels, dtype=torch.bool)
            for p in out.present.values():
                rows |= p
            loss = self._ce(out.logits, labels, rows)
            if loss is not None:
                parts["cls_fused"] = loss
        if self.per_modality:
            for m, logits in out.modality_logits.items():
                loss = self._ce(logits, labels, present_of(out, batch, m))
                if loss is not None:
                    parts[f"cls_{m}"] = loss
        return self._result(out, parts)
