"""Symmetric InfoNCE over any set of modality pairs, with cross-worker negatives."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F

from models.model import OmniOutput
from models.objectives.base import Objective, present_of

GatherFn = Callable[[torch.Tensor], torch.Tensor]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` ``(B, ...)`` from every rank along dim 0, keeping gradients
    (``torch.distributed.nn.all_gather``); identity when not distributed. Every rank must
    pass the same ``B`` (pad otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn import all_gather

    return torch.cat(all_gather(x), 0)


class ContrastiveLoss(Objective):
    """CLIP-style symmetric InfoNCE with the model's learnable temperature.

    Args:
        pairs: Modality pairs, e.g. ``[("image", "text"), ("audio", "image")]``; a member
            may be ``"fused"`` (the fused embedding). Default: every pair of the
            modalities present in the output.
        gather_fn: Maps a local ``(B, ...)`` tensor to the global ``(W*B, ...)`` one with
            gradients (e.g. :func:`all_gather_with_grad`) so negatives come from every
            worker. Identity by default.
        use_labels: Rows sharing a (known) label are positives too (multi-positive soft
            targets); for semantically paired corpora such as OmniDigits.
        max_logit_scale: Clamp of ``exp(logit_scale)``.
        weight: Loss weight.
    """

    name = "contrastive"
    batch_keys = ("{m}_present", "label")

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] | None = None,
        *,
        gather_fn: GatherFn | None = None,
        use_labels: bool = False,
        max_logit_scale: float = 100.0,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        self.pairs = [tuple(p) for p in pairs] if pairs is not None else None
        self.gather_fn = gather_fn
        self.use_labels = use_labels
        self.max_logit_scale = max_logit_scale

    def _embed(self, out: OmniOutput, batch: Mapping[str, Any], m: str):
        if m == "fused":
            if out.fused is None:
                return None, None
            rows = torch.zeros(out.fused.shape[0], dtype=torch.bool, device=out.fused.device)
            for p in out.present.values():
                rows |= p
            return out.fused, rows
        if m not in out.embeds:
            return None, None
        return out.embeds[m], present_of(out, batch, m)

    def pair_loss(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        rows: torch.Tensor,
        logit_scale: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """InfoNCE of one pair over the (gathered) rows where both are present.

        Args:
            a, b: ``(B, E)`` L2-normalized embeddings.
            rows: ``(B,)`` bool rows to use.
            logit_scale: Log inverse temperature (scalar).
            labels: ``(B,)`` int64 (-100 unknown), for multi-positive targets.

        Returns:
            Scalar loss, or None when fewer than 2 rows are usable.
        """
        g = self.gather_fn or (lambda x: x)
        a, b = g(a), g(b)
        rows = g(rows.to(a.dtype)) > 0.5
        if labels is not None:
            labels = g(labels.to(a.dtype)).round().long()
        if int(rows.sum()) < 2:
            return None
        a, b = a[rows], b[rows]
        logits = logit_scale.exp().clamp(max=self.max_logit_scale) * a @ b.t()  # (n, n)
        n = logits.shape[0]
        eye = torch.eye(n, device=logits.device)
        if labels is not None:
            lab = labels[rows]
            known = lab >= 0
            same = (lab[:, None] == lab[None, :]) & known[:, None] & known[None, :]
            target = (same.to(logits.dtype) + eye).clamp(max=1.0)
            target = target / target.sum(1, keepdim=True)
            loss_ab = -(target * logits.log_softmax(1)).sum(1).mean()
            loss_ba = -(target.t() * logits.t().log_softmax(1)).sum(1).mean()
        else:
            idx = torch.arange(n, device=logits.device)
            loss_ab = F.cross_entropy(logits, idx)
            loss_ba = F.cross_entropy(logits.t(), idx)
        return 0.5 * (loss_ab + loss_ba)

    def forward(self, out: OmniOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if out.logit_scale is None:
            raise ValueError("ContrastiveLoss needs out.logit_scale")
        pairs = self.pairs
        if pairs is None:
            pairs = list(combinations(list(out.embeds), 2))
        labels = batch.get("label") if self.use_labels else None
        parts: dict[str, torch.Tensor] = {}
        for ma, mb in pairs:
            a, ra = self._embed(out, batch, ma)
            b, rb = self._embed(out, batch, mb)
            if a is None or b is None:
                continue
            loss = self.pair_loss(a, b, ra & rb, out.logit_scale, labels)
            if loss is not None:
                parts[f"contrastive_{ma}_{mb}"] = loss
        return self._result(out, parts)
