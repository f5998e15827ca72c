"""Stage objectives: which forward each stage runs and how its loss terms combine.

* ``pretrain``: unimodal masked token/patch modelling (``recon_cross=False``) + MoE aux.
* ``align``: InfoNCE over ``align.pairs`` with features gathered across ranks *with*
  gradients (OpenCLIP's local loss), masked-modality reconstruction from the other
  modalities (one modality masked per step, rotating, same on every rank), modality -> text
  translation (captioning), MoE aux.
* ``finetune``: classification (fused + every single modality, with per-row modality
  dropout so that subsets work), retrieval (label-aware InfoNCE over the aligned pairs, so
  pairs left out of alignment stay "emergent"), description (captioning), MoE aux.

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

IGNORE = -100


def build_model_from_kwargs(
    kwargs: dict[str, Any], init_from: str | None = None
) -> torch.nn.Module:
    """``{"size": name, **OmniConfig overrides}`` -> model, optionally with earlier weights.

    Args:
        kwargs: ``size`` plus ``OmniConfig.from_name`` overrides.
        init_from: Dir with ``model.safetensors`` of the previous stage (strictly loaded).
    """
    from models import OmniConfig, build_model

    kw = dict(kwargs)
    cfg = OmniConfig.from_name(kw.pop("size"), **kw)
    model = build_model(cfg)
    if init_from:
        from safetensors.torch import load_file

        state = load_file(f"{init_from}/model.safetensors")
        model.load_state_dict(state, strict=True)
    return model


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def recon_loss(r: Any) -> torch.Tensor:
    """Masked-modelling loss of one ``ReconOutput``: CE (tokens), MSE (patches), Chamfer
    (points); 0 (with a graph) when nothing is masked."""
    m = r.mask
    if not bool(m.any()):
        return r.pred.sum() * 0.0
    pred, tgt = r.pred[m], r.target[m]
    if r.kind == "tokens":
        return F.cross_entropy(pred.float(), tgt.long())
    if r.kind == "points":
        p = pred.float().reshape(pred.shape[0], -1, 3)
        t = tgt.float().reshape(tgt.shape[0], -1, 3)
        d = torch.cdist(p, t)  # (G, K, K)
        return d.min(2).values.pow(2).mean() + d.min(1).values.pow(2).mean()
    return F.mse_loss(pred.float(), tgt.float())


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    pa: torch.Tensor,
    pb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    max_scale: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between modalities a and b, local queries vs gathered keys.

    Args:
        a, b: ``(B, E)`` L2-normalized embeddings of this rank.
        pa, pb: ``(B,)`` bool presence; only rows with both are queries, only present
            rows are keys.
        logit_scale: Learnable log inverse temperature.
        max_scale: Clamp of ``logit_scale.exp()``.
        labels: ``(B,)`` class ids: when given, every key of the query's class is a
            positive (multi-positive, supervised-contrastive targets); else the same row.

    Returns:
        Scalar loss (0 with a graph when no row has both modalities).
    """
    bsz = a.shape[0]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    # Every collective runs on every rank, in the same order, whatever this rank's rows hold:
    # an early return on one rank would leave the others waiting in all_gather (or in its
    # backward), so empty cases are handled by masks, never by skipping.
    ga, gb = gather_with_grad(a), gather_with_grad(b)  # (W*B, E)
    gpa, gpb = _gather_plain(pa), _gather_plain(pb)
    gl = _gather_plain(labels) if labels is not None else None
    scale = logit_scale.exp().clamp(max=max_scale)
    both = pa & pb
    # Zero that still touches every input, so each rank's graph has the same parameters.
    zero = (ga.sum() + gb.sum() + scale.sum()) * 0.0
    if not bool(both.any()):
        return zero
    rows = torch.arange(bsz, device=a.device)
    if gl is not None:
        tgt = (labels[:, None] == gl[None, :]) & (labels[:, None] != IGNORE)
    else:
        tgt = torch.zeros(bsz, ga.shape[0], dtype=torch.bool, device=a.device)
    tgt[rows, rows + rank * bsz] = True  # each row's own pair in the gathered keys
    loss = zero
    for q, keys, key_present in ((a, gb, gpb), (b, ga, gpa)):
        logits = scale * q @ keys.t()  # (B, W*B)
        logits = logits.masked_fill(~key_present[None, :], float("-inf"))
        t = (tgt & key_present[None, :]).float()
        t = t / t.sum(1, keepdim=True).clamp_min(1.0)
        logp = logits.float().log_softmax(1).masked_fill(~key_present[None, :], 0.0)
        loss = loss + (-(t * logp).sum(1))[both].mean()
    return loss / 2


def caption_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], m: str) -> torch.Tensor:
    """Teacher-forced modality -> text CE over real text tokens of rows having both."""
    ids = batch["text"].long()[:, 1:]
    mask = batch.get("text_mask")
    mask = (ids != 0) if mask is None else mask.bool()[:, 1:]
    rows = batch[f"{m}_present"].bool() & batch["text_present"].bool()
    mask = mask & rows[:, None]
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), ids[mask])


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over ``rows`` (0 with a graph when there is none)."""
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows].float(), labels[rows])


def _gather_plain(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class StageObjective:
    """Collation + forward + loss terms of one stage.

    Args:
        stage: ``pretrain`` | ``align`` | ``finetune``.
        st: The stage config (mask ratio, pairs, weights, dropout, tasks).
        modalities: Modalities collated every step (all of the stage, on every rank).
        label_names: Class order for ``batch["label"]``.
        pairs: Modality pairs for InfoNCE (align, finetune retrieval).
        seed: Seed of the per-step modality dropout / masked-modality choice.
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
    ) -> None:
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
        if self.stage == "align":
            return ("recon", "decoder")
        tasks = set(self.st.tasks)
        parts: list[str] = []
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
                terms[f"recon_{m}"] = self.w("recon") * recon_loss(r)
        elif self.stage == "align":
            # One modality masked per step (rotating, identical on all ranks) is rebuilt from
            # the others; its masked embedding is kept out of that step's InfoNCE terms.
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
            for a, b in self.pairs:
                if a in out.embeds and b in out.embeds and masked not in (a, b):
                    terms[f"nce_{a}_{b}"] = self.w("nce") * contrastive_loss(
                        out.embeds[a],
                        out.embeds[b],
                        out.present[a],
                        out.present[b],
                        out.logit_scale,
                        max_scale=cfg.max_logit_scale,
                        labels=batch["label"] if self.st.label_positives else None,
                    )
            for m, r in out.recon.items():
                terms[f"xrecon_{m}"] = self.w("recon") * recon_loss(r)
            for m, lg in out.caption_logits.items():
                terms[f"caption_{m}"] = self.w("caption") * caption_loss(lg, batch, m)
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
                valid = labels != IGNORE
                terms["cls_fused"] = self.w("classification") * _masked_ce(
                    out.logits, labels, valid
                )
                n_mod = max(1, len(out.modality_logits))
                for m, lg in out.modality_logits.items():
                    rows = valid & out.present[m]
                    terms[f"cls_{m}"] = (
                        self.w("classification") * _masked_ce(lg, labels, rows) / n_mod
                    )
            if "retrieval" in tasks:
                for a, b in self.pairs:
                    if a in out.embeds and b in out.embeds:
                        terms[f"nce_{a}_{b}"] = self.w("retrieval") * contrastive_loss(
                            out.embeds[a],
                            out.embeds[b],
                            out.present[a],
                            out.present[b],
                            out.logit_scale,
                            max_scale=cfg.max_logit_scale,
                            labels=labels,
                        )
            if "description" in tasks:
                for m, lg in out.caption_logits.items():
                    terms[f"caption_{m}"] = self.w("description") * caption_loss(lg, batch, m)
        else:
            raise ValueError(f"unknown stage {self.stage!r}")
        if out.aux:
            terms["moe_aux"] = cfg.aux_loss_weight * out.aux["moe_aux"]
            terms["moe_z"] = cfg.z_loss_weight * out.aux["moe_z"]
        if not terms:
            raise RuntimeError(
                f"{self.stage}: the batch produced no loss term (modalities {active})"
            )
        total = sum(terms.values())
        return {"loss": total, **terms}, out

    @staticmethod
    def token_counts(out: Any) -> dict[str, torch.Tensor]:
        """``{modality: valid tokens}`` of a forward, as device tensors (no host sync)."""
        return {m: f.mask.sum() for m, f in getattr(out, "features", {}).items()}
