"""Stage selection: which forward each stage runs and which losses it combines.

The loss math lives in :mod:`models.objectives`; this module picks the terms, their weights
(``<stage>.loss_weights``) and injects the cross-rank gather (:func:`gather_with_grad`).

* ``pretrain``: unimodal masked token/patch modelling (``recon_cross=False``) + MoE aux.
* ``align``: InfoNCE over ``align.pairs`` with features gathered across ranks *with*
  gradients (OpenCLIP's local loss), masked-modality reconstruction from the other
  modalities (one modality masked per step, rotating, same on every rank), modality -> text
  translation (captioning), modality -> image/audio/signal/point cloud translation (flow
  matching of the generation heads, ``loss_weights.generate``), MoE aux.
* ``finetune``: classification (fused + every single modality, with per-row modality
  dropout so that subsets work), retrieval (label-aware InfoNCE over the aligned pairs, so
  pairs left out of alignment stay "emergent"), description (captioning), generation
  refined (also from the fused embedding when fusion runs), MoE aux.

ZeRO-3 needs every rank to call the same modules: :meth:`StageObjective.sync_modalities`
keeps, per micro-batch, only modalities present on *every* rank (one small all-reduce).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from jobs.training.config import StageSection
from jobs.training.engine import gather_with_grad
from models.objectives import (
    IGNORE_INDEX,
    caption_loss,
    flow_matching_loss,
    info_nce,
    masked_cross_entropy,
    moe_aux_terms,
    recon_loss,
)


def class_weights(
    mode: str, label_names: list[str], label_counts: dict[str, int]
) -> list[float] | None:
    """Classification loss weights from the train split's class frequencies.

    Args:
        mode: ``"none"`` or ``"balanced"`` (``finetune.class_weighting``).
        label_names: ``C`` class names in head order.
        label_counts: Train rows per class name.

    Returns:
        ``None`` for ``"none"``; else ``C`` weights ``N / (C * n_c)`` (a class without train
        rows gets the largest weight of the others: it cannot occur in a train batch anyway).
    """
    if mode == "none" or not label_names:
        return None
    if mode != "balanced":
        raise ValueError(f"finetune.class_weighting must be none|balanced, got {mode!r}")
    counts = [int(label_counts.get(c, 0)) for c in label_names]
    total, n_cls = sum(counts), len(label_names)
    w = [total / (n_cls * n) if n > 0 else 0.0 for n in counts]
    top = max(w) if any(w) else 1.0
    return [x if x > 0 else top for x in w]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StageObjective:
    """Collation + forward + loss terms of one stage.

    Args:
        stage: ``pretrain`` | ``align`` | ``finetune``.
        st: The stage config (mask ratio, pairs, weights, dropout, tasks).
        modalities: Modalities collated every step (all of the stage, on every rank).
        label_names: Class order for ``batch["label"]``.
        pairs: Modality pairs for InfoNCE (align, finetune retrieval).
        seed: Seed of the per-step modality dropout / masked-modality choice.
        class_weights: ``(C,)`` weights of the finetune classification loss, in
            ``label_names`` order (:func:`class_weights`); None = unweighted.
    """

    def __init__(
        self,
        stage: str,
        st: StageSection,
        *,
        modalities: list[str],
        label_names: list[str],
        pairs: list[list[str]] | None = None,
        seed: int = 0,
        class_weights: list[float] | None = None,
    ) -> None:
        if class_weights is not None and len(class_weights) != len(label_names):
            raise ValueError(
                f"{len(class_weights)} class weights for {len(label_names)} label names"
            )
        self.class_weights = (
            torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        )
        self.stage = stage
        self.st = st
        self.modalities = list(modalities)
        self.label_names = list(label_names)
        self.pairs = [tuple(p) for p in (pairs or [])]
        self.seed = seed

    def w(self, name: str) -> float:
        return float(self.st.loss_weights.get(name, 1.0))

    # ----------------------------------------------------------------- what the stage uses
    def forward_parts(self) -> tuple[str, ...]:
        """Optional model parts (``models.model.PARTS``) whose outputs this stage's losses
        read; the forward runs only these (pretraining computes no fusion or logits)."""
        if self.stage == "pretrain":
            return ("recon",)
        gen = ("generate",) if self.w("generate") > 0 else ()
        if self.stage == "align":
            return ("recon", "decoder", *gen)
        tasks = set(self.st.tasks)
        parts: list[str] = list(gen)
        if "classification" in tasks:
            parts += ["fusion", "classifier"]
        if "description" in tasks:
            parts.append("decoder")
        return tuple(parts)

    def unused_modules(self) -> list[str]:
        """Model attributes no loss term of this stage can reach.

        Their parameters would get no gradient; DeepSpeed would still zero-fill those
        gradients and run the optimizer (and weight decay) over them every step.
        """
        parts = set(self.forward_parts())
        unused = [
            attr
            for part, attr in (
                ("fusion", "fusion"),
                ("recon", "recon_heads"),
                ("decoder", "decoder"),
                ("classifier", "classifier"),
                ("generate", "generators"),
            )
            if part not in parts
        ]
        # Embeddings feed align's InfoNCE and finetune's retrieval and per-modality logits;
        # the temperature only the InfoNCE terms.
        tasks = set(self.st.tasks) if self.stage == "finetune" else set()
        if self.stage != "align" and not tasks & {"classification", "retrieval"}:
            unused.append("projections")
        if self.stage != "align" and "retrieval" not in tasks:
            unused.append("logit_scale")
        return unused

    def freeze_unused(self, model: torch.nn.Module) -> list[str]:
        """Sets ``requires_grad=False`` on :meth:`unused_modules`; returns the names that
        held trainable parameters."""
        frozen = []
        for attr in self.unused_modules():
            obj = getattr(model, attr, None)
            if obj is None:
                continue
            params = [obj] if isinstance(obj, torch.nn.Parameter) else list(obj.parameters())
            if any(p.requires_grad for p in params):
                frozen.append(attr)
            for p in params:
                p.requires_grad_(False)
        return frozen

    # ----------------------------------------------------------------- batches
    def collate(self, samples: list[dict[str, Any]], label_names: list[str]) -> dict[str, Any]:
        from models.data import collate

        return collate(samples, modalities=self.modalities, label_names=label_names)

    def modality_dropout(self, batch: dict[str, Any], step: int, rank: int) -> None:
        """finetune: each row loses each modality with prob ``modality_dropout`` (keeps >= 1)."""
        p = self.st.modality_dropout
        if p <= 0:
            return
        mods = [m for m in self.modalities if f"{m}_present" in batch and m in batch]
        if len(mods) < 2:
            return
        # Drawn on the CPU (the same numbers on any device), then moved to the batch's.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + rank)
        present = torch.stack([batch[f"{m}_present"] for m in mods], 1)  # (B, M)
        drop = (torch.rand(present.shape, generator=g).to(present.device) < p) & present
        keep = present & ~drop
        # A row left with nothing keeps one of its modalities (random among present).
        empty = ~keep.any(1) & present.any(1)
        if bool(empty.any()):
            score = torch.rand(present.shape, generator=g).to(present.device)
            score = score.masked_fill(~present, -1.0)
            pick = F.one_hot(score.argmax(1), len(mods)).bool()
            keep = torch.where(empty[:, None], pick, keep)
        for i, m in enumerate(mods):
            batch[f"{m}_present"] = keep[:, i]

    def sync_modalities(self, batch: dict[str, Any]) -> list[str]:
        """Drops, on every rank, modalities absent from this micro-batch on *any* rank."""
        have = [m in batch and bool(batch[f"{m}_present"].any()) for m in self.modalities]
        flags = torch.tensor(have, dtype=torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = batch[next(iter(batch))].device
            flags = flags.to(dev)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            flags = flags.cpu()
        common = [m for m, f in zip(self.modalities, flags.tolist(), strict=True) if f]
        for m in self.modalities:
            if m not in common:
                for k in (m, f"{m}_mask"):
                    batch.pop(k, None)
                if f"{m}_present" in batch:
                    batch[f"{m}_present"] = torch.zeros_like(batch[f"{m}_present"])
        return common

    # ----------------------------------------------------------------- forward + loss
    def __call__(
        self, engine: Any, batch: dict[str, Any], *, step: int, rank: int = 0
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """One micro-batch: returns ``({"loss": total, term: value, ...}, OmniOutput)``."""
        model = engine.module if hasattr(engine, "module") else engine
        cfg = model.config
        if self.stage == "finetune":
            self.modality_dropout(batch, step, rank)
        active = self.sync_modalities(batch)
        terms: dict[str, torch.Tensor] = {}
        if self.stage == "pretrain":
            out = engine(
                batch,
                modalities=active,
                mask_ratio=self.st.mask_ratio,
                recon_cross=False,
                parts=self.forward_parts(),
            )
            for m, r in out.recon.items():
                terms[f"recon_{m}"] = self.w("recon") * self._recon(r)
        elif self.stage == "align":
            # One modality masked per step (rotating, identical on all ranks) is rebuilt from
            # the others; its masked embedding is kept out of that step's InfoNCE terms
            # unless only pairs with it are left.
            masked = active[step % len(active)] if active else None
            ratio = {masked: self.st.mask_ratio} if masked and self.st.mask_ratio > 0 else None
            out = engine(
                batch,
                modalities=active,
                mask_ratio=ratio,
                recon_cross=True,
                caption="text" in active,
                parts=self.forward_parts(),
            )
            present = [(a, b) for a, b in self.pairs if a in out.embeds and b in out.embeds]
            # When every pair contains the masked modality (two modalities: one pair), its
            # masked view is contrasted too, as FLIP does; else no step would align anything.
            unmasked = [p for p in present if masked not in p]
            labels = batch["label"] if self.st.label_positives else None
            for a, b in unmasked or present:
                terms[f"nce_{a}_{b}"] = self.w("nce") * self._nce(out, a, b, cfg, labels)
            for m, r in out.recon.items():
                terms[f"xrecon_{m}"] = self.w("recon") * self._recon(r)
            for m, lg in out.caption_logits.items():
                terms[f"caption_{m}"] = self.w("caption") * self._caption(lg, batch, m)
            terms.update(self._generation_terms(out))
        elif self.stage == "finetune":
            tasks = set(self.st.tasks)
            out = engine(
                batch,
                modalities=active,
                caption="description" in tasks and "text" in active,
                parts=self.forward_parts(),
            )
            labels = batch["label"]
            if "classification" in tasks and out.logits is not None:
                # Zero-with-graph fallbacks keep every rank's graph over the same parameters.
                valid = labels != IGNORE_INDEX
                cw = self.class_weights
                ls = self.st.label_smoothing
                terms["cls_fused"] = self.w("classification") * masked_cross_entropy(
                    out.logits, labels, valid, cw, ls
                )
                # Each modality's own head term: loss_weights.classification_modality, by
                # default the fused term's weight shared out over the modalities.
                n_mod = max(1, len(out.modality_logits))
                w_mod = self.st.loss_weights.get("classification_modality")
                w_mod = self.w("classification") / n_mod if w_mod is None else float(w_mod)
                for m, lg in out.modality_logits.items():
                    rows = valid & out.present[m]
                    terms[f"cls_{m}"] = w_mod * masked_cross_entropy(lg, labels, rows, cw, ls)
            if "retrieval" in tasks:
                for a, b in self.pairs:
                    if a in out.embeds and b in out.embeds:
                        terms[f"nce_{a}_{b}"] = self.w("retrieval") * self._nce(
                            out, a, b, cfg, labels
                        )
            if "description" in tasks:
                for m, lg in out.caption_logits.items():
                    terms[f"caption_{m}"] = self.w("description") * self._caption(lg, batch, m)
            terms.update(self._generation_terms(out))
        else:
            raise ValueError(f"unknown stage {self.stage!r}")
        terms.update(moe_aux_terms(out.aux, cfg.aux_loss_weight, cfg.z_loss_weight))
        if not terms:
            raise RuntimeError(
                f"{self.stage}: the batch produced no loss term (modalities {active})"
            )
        total = sum(terms.values())
        return {"loss": total, **terms}, out

    # ----------------------------------------------------------------- loss terms
    def _generation_terms(self, out: Any) -> dict[str, torch.Tensor]:
        """``gen_<target>``: flow matching of each generation head (empty without heads)."""
        return {
            f"gen_{m}": self.w("generate") * flow_matching_loss(fo) for m, fo in out.flow.items()
        }

    def _recon(self, r: Any) -> torch.Tensor:
        return recon_loss(r, norm_pix_targets=self.st.norm_pix_targets)

    @staticmethod
    def _caption(logits: torch.Tensor, batch: dict[str, Any], m: str) -> torch.Tensor:
        rows = batch[f"{m}_present"].bool() & batch["text_present"].bool()
        return caption_loss(logits, batch["text"], rows, batch.get("text_mask"))

    @staticmethod
    def _nce(out: Any, a: str, b: str, cfg: Any, labels: torch.Tensor | None) -> torch.Tensor:
        """InfoNCE of pair ``(a, b)``, negatives gathered from every rank (with gradients)."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return info_nce(
            out.embeds[a],
            out.embeds[b],
            out.present[a],
            out.present[b],
            out.logit_scale,
            max_scale=cfg.max_logit_scale,
            labels=labels,
            gather=gather_with_grad,
            rank=rank,
        )

    @staticmethod
    def token_counts(out: Any) -> dict[str, torch.Tensor]:
        """``{modality: valid tokens}`` of a forward, as device tensors (no host sync)."""
        return {m: f.mask.sum() for m, f in getattr(out, "features", {}).items()}
