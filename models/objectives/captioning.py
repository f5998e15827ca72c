"""Modality -> text captioning (teacher-forced next-token cross-entropy)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from models.model import OmniOutput
from models.objectives.base import Objective, present_of


class CaptioningLoss(Objective):
    """Cross-entropy of ``out.caption_logits[m]`` ``(B, L-1, V)`` against
    ``batch["text"][:, 1:]`` over real text tokens of rows having both ``m`` and text.

    Args:
        label_smoothing: Cross-entropy label smoothing.
        weight: Loss weight.
    """

    name = "caption"
    batch_keys = ("text", "text_mask", "text_present", "{m}_present")

    def __init__(self, *, label_smoothing: float = 0.0, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.label_smoothing = label_smoothing
        self.model_kwargs = {"caption": True}

    def forward(self, out: OmniOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        parts = {}
        if out.caption_logits:
            ids = batch["text"].long()
            tmask = batch.get("text_mask")
            tmask = (ids != 0) if tmask is None else tmask.bool()
            text_rows = batch.get("text_present")
            text_rows = (
                torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
                if text_rows is None
                else text_rows
            )
            target = ids[:, 1:]
            for m, logits in out.caption_logits.items():
                rows = present_of(out, batch, m) & text_rows.bool()
                sel = tmask[:, 1:] & rows[:, None]
                if not bool(sel.any()):
                    continue
                parts[f"caption_{m}"] = F.cross_entropy(
                    logits[sel].float(), target[sel], label_smoothing=self.label_smoothing
                )
        return self._result(out, parts)
