"""``OmniModel``: encoders -> shared MoE trunk -> adapters -> fusion -> heads.

The model is composed by injection (:func:`build_model` builds the parts and hands them
in); it checks that the parts' modality keys agree. A forward runs only the branches of
the modalities present in the batch, so a text-only request never touches the image,
audio or video parameters. Serving replicas may hold a single branch
(``OmniModel.from_pretrained(dir, modalities=[m], parts=[])``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import OmniConfig
from models.encoders import ModalityEncoder, build_encoder
from models.fusion import GatedFusion
from models.generation import build_generators
from models.heads import Adapter, ClassifierHead, ProjectionHead, ReconHead, TextDecoder
from models.layers import masked_mean
from models.outputs import ModalityFeatures, OmniOutput, ReconOutput
from models.pretrained import CONFIG_NAME, WEIGHTS_NAME
from models.trunk import MoETrunk

#: Optional parts besides the per-modality branches and the trunk.
PARTS: tuple[str, ...] = ("fusion", "recon", "decoder", "classifier", "generate")


class OmniModel(nn.Module):
    """The omni-modal sparse-MoE model (see module docstring)."""

    def __init__(
        self,
        config: OmniConfig,
        *,
        encoders: dict[str, ModalityEncoder],
        trunk: MoETrunk | None,
        adapters: dict[str, nn.Module],
        projections: dict[str, nn.Module],
        fusion: GatedFusion | None = None,
        recon_heads: dict[str, nn.Module] | None = None,
        decoder: TextDecoder | None = None,
        classifier: nn.Module | None = None,
        generators: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        keys = set(encoders)
        for name, part in (("adapters", adapters), ("projections", projections)):
            if set(part) != keys:
                raise ValueError(f"{name} keys {sorted(part)} != encoder keys {sorted(keys)}")
        if generators and not set(generators) <= keys:
            raise ValueError(f"generators {sorted(generators)} lack encoders ({sorted(keys)})")
        if recon_heads and set(recon_heads) != keys:
            raise ValueError(f"recon_heads keys {sorted(recon_heads)} != {sorted(keys)}")
        unknown = keys - set(config.modalities)
        if unknown:
            raise ValueError(f"encoders {sorted(unknown)} not in config.modalities")
        self.config = config
        self.encoders = nn.ModuleDict(encoders)
        self.trunk = trunk
        self.adapters = nn.ModuleDict(adapters)
        self.projections = nn.ModuleDict(projections)
        self.fusion = fusion
        self.recon_heads = nn.ModuleDict(recon_heads or {})
        self.decoder = decoder
        self.classifier = classifier
        #: ``{target: models.generation.FlowGenerator}`` (modality translation heads).
        self.generators = nn.ModuleDict(generators or {})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    # ------------------------------------------------------------------ introspection
    @property
    def modalities(self) -> list[str]:
        """Loaded modality branches, in config order."""
        return [m for m in self.config.modalities if m in self.encoders]

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def active_parameters_per_token(self, modality: str | None = None) -> int:
        """Parameters a token of ``modality`` touches (its encoder branch, the shared
        attention and norms, ``top_k`` of the experts, adapter and projection).

        With ``modality=None``: the trunk alone.
        """
        cfg = self.config
        if self.trunk is None:
            raise RuntimeError("this model was loaded without any branch (no trunk)")
        total = 0
        for layer in self.trunk.layers:
            expert_params = 0
            for name, p in layer.named_parameters():
                if "experts." in name:  # native and DeepSpeed expert weights
                    expert_params += p.numel()
                else:
                    total += p.numel()
            if expert_params:  # only top_k of the num_experts experts run per token
                total += expert_params * cfg.top_k // cfg.num_experts
        total += sum(p.numel() for p in self.trunk.norm.parameters())
        if modality is None:
            return total
        for part in (self.encoders, self.adapters, self.projections):
            total += sum(p.numel() for p in part[modality].parameters())
        return total

    def _present(self, m: str, batch: dict[str, Any]) -> torch.Tensor:
        x = batch[m]
        p = batch.get(f"{m}_present")
        if p is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return p.to(device=x.device, dtype=torch.bool)

    def _active(self, batch: dict[str, Any], modalities: Sequence[str] | None) -> list[str]:
        if modalities is not None:
            missing = [m for m in modalities if m not in self.encoders]
            if missing:
                raise KeyError(f"modalities {missing} are not loaded (loaded: {self.modalities})")
        want = self.modalities if modalities is None else list(modalities)
        out = []
        for m in want:
            if m in batch and batch[m] is not None and bool(self._present(m, batch).any()):
                out.append(m)
        return out

    # ------------------------------------------------------------------ split API
    def encode_features(
        self, modality: str, batch: dict[str, Any], *, mask_ratio: float | None = None
    ) -> ModalityFeatures:
        """Encoder -> trunk -> adapter -> pooled/embedding for one modality.

        Args:
            modality: A loaded modality.
            batch: Collated batch holding ``batch[modality]`` (and its ``_mask`` /
                ``_present`` entries when available).
            mask_ratio: Optional fraction of tokens replaced by ``[MASK]`` for masked
                modelling.

        Returns:
            :class:`ModalityFeatures` (tokens ``(B, N, d)``, pooled ``(B, d)``, embed ``(B, E)``).
        """
        if modality not in self.encoders:
            raise KeyError(f"modality {modality!r} is not loaded (loaded: {self.modalities})")
        present = self._present(modality, batch)
        enc = self.encoders[modality].encode(batch, mask_ratio=mask_ratio, present=present)
        x, stats = self.trunk(enc.tokens, enc.mask)
        return self._features(modality, enc, x, stats, present)

    def _features(self, modality, enc, x, stats, present) -> ModalityFeatures:
        """Adapter, pooling and projection after the trunk."""
        x = self.adapters[modality](x)
        pooled = masked_mean(x, enc.mask)
        embed = self.projections[modality](pooled)
        return ModalityFeatures(
            tokens=x,
            mask=enc.mask,
            pooled=pooled,
            embed=embed,
            present=present,
            masked=enc.masked,
            targets=enc.targets,
            stats=stats,
        )

    def encode_many(
        self,
        batch: dict[str, Any],
        modalities: Sequence[str],
        *,
        mask_ratio: dict[str, float] | None = None,
    ) -> dict[str, ModalityFeatures]:
        """:meth:`encode_features` for several modalities with one packed trunk pass
        (same per-token results; the MoE runs larger, more efficient expert GEMMs).

        Returns:
            ``{m: ModalityFeatures}``.
        """
        ratios = mask_ratio or {}
        encs, presents = {}, {}
        for m in modalities:
            if m not in self.encoders:
                raise KeyError(f"modality {m!r} is not loaded (loaded: {self.modalities})")
            presents[m] = self._present(m, batch)
            encs[m] = self.encoders[m].encode(batch, mask_ratio=ratios.get(m), present=presents[m])
        outs = self.trunk.forward_many([(encs[m].tokens, encs[m].mask) for m in modalities])
        return {
            m: self._features(m, encs[m], x, stats, presents[m])
            for m, (x, stats) in zip(modalities, outs, strict=True)
        }

    def fuse_features(
        self, features: dict[str, ModalityFeatures]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention + gated fusion of any subset of modalities.

        Returns:
            ``fused (B, E)`` (L2-normalized) and ``gates (B, M)`` in
            ``config.modalities`` order, 0 for modalities missing in a row.
        """
        if self.fusion is None:
            raise RuntimeError("this model was loaded without the 'fusion' part")
        present = {
            m: f.present
            if f.present is not None
            else torch.ones(f.pooled.shape[0], dtype=torch.bool, device=f.pooled.device)
            for m, f in features.items()
        }
        return self.fusion(
            {m: f.pooled for m, f in features.items()},
            {m: f.tokens for m, f in features.items()},
            {m: f.mask for m, f in features.items()},
            present,
        )

    @staticmethod
    def _memory(features: dict[str, ModalityFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.cat([f.tokens for f in features.values()], 1)  # (B, sum N, d)
        mask = torch.cat(
            [
                f.mask & (f.present[:, None] if f.present is not None else True)
                for f in features.values()
            ],
            1,
        )
        return tokens, mask

    def generate_from_features(
        self, features: dict[str, ModalityFeatures], *, max_len: int = 16, num_beams: int = 1
    ) -> list[list[int]]:
        """Any modality (or several) -> text ids (greedy or beam search)."""
        if self.decoder is None:
            raise RuntimeError("this model was loaded without the 'decoder' part")
        if not features:
            raise ValueError("generate_from_features needs at least one modality")
        memory, mask = self._memory(features)
        return self.decoder.generate(memory, mask, max_len=max_len, num_beams=num_beams)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` fused or single-modality embedding -> ``(B, num_classes)`` logits."""
        if self.classifier is None:
            raise RuntimeError("no classifier: num_classes is 0 or 'classifier' not loaded")
        return self.classifier(embedding)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        batch: dict[str, Any],
        modalities: Sequence[str] | None = None,
        mask_ratio: float | dict[str, float] | None = None,
        *,
        recon_cross: bool = True,
        caption: bool = False,
        parts: Collection[str] | None = None,
    ) -> OmniOutput:
        """Runs the branches of the modalities present in ``batch``.

        Args:
            batch: Output of :func:`models.data.collate`.
            modalities: Restrict to these modalities (default: all loaded ones present).
            mask_ratio: Masked modelling: a fraction for every modality, or ``{m: ratio}``.
                Returns ``out.recon[m]`` with predictions and targets.
            recon_cross: Masked tokens also attend to the other modalities (cross-modal
                reconstruction); False = unimodal.
            caption: Teacher-forced modality -> text logits ``out.caption_logits[m]``
                ``(B, L-1, V)`` for every non-text modality (targets ``batch["text"][:, 1:]``).
            parts: Optional parts (of :data:`PARTS`) this forward may run; default all loaded
                ones. A training stage names only what its losses read, so e.g. unimodal
                pretraining computes no fusion or classifier logits.

        Returns:
            :class:`OmniOutput`.
        """
        active = self._active(batch, modalities)
        run = set(PARTS) if parts is None else set(parts)
        unknown = run - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; known: {list(PARTS)}")
        out = OmniOutput(
            logit_scale=self.logit_scale, fusion_modalities=list(self.config.modalities)
        )
        ratios: dict[str, float] = {}
        if isinstance(mask_ratio, dict):
            ratios = {m: r for m, r in mask_ratio.items() if r}
        elif mask_ratio:
            ratios = dict.fromkeys(active, float(mask_ratio))
        feats = self.encode_many(batch, active, mask_ratio=ratios) if active else {}
        for m, f in feats.items():
            out.features[m] = f
            out.embeds[m] = f.embed
            out.pooled[m] = f.pooled
            out.present[m] = f.present
            out.expert_load[m] = f.stats.counts.detach()
            out.dropped[m] = f.stats.dropped.detach()
        if feats:
            # The packed trunk pass balances experts over the whole batch (joint values).
            out.aux = {
                "moe_aux": torch.stack([f.stats.aux for f in feats.values()]).mean(),
                "moe_z": torch.stack([f.stats.z for f in feats.values()]).mean(),
            }
            if self.fusion is not None and "fusion" in run:
                out.fused, out.gates = self.fuse_features(feats)
        for m, f in feats.items():
            if f.masked is None or m not in self.recon_heads or "recon" not in run:
                continue
            others = {o: g for o, g in feats.items() if o != m}
            ctx, ctx_mask = self._memory(others) if (recon_cross and others) else (None, None)
            pred = self.recon_heads[m](f.tokens, ctx, ctx_mask)
            out.recon[m] = ReconOutput(
                pred=pred,
                target=f.targets,
                mask=f.masked & f.mask,
                kind=self.encoders[m].target_kind,
                cross=ctx is not None,
            )
        if caption and self.decoder is not None and "decoder" in run and "text" in batch:
            ids = batch["text"].long()
            ids_mask = batch.get("text_mask")
            ids_mask = (ids != self.config.pad_id) if ids_mask is None else ids_mask.bool()
            for m, f in feats.items():
                if m == "text":
                    continue
                memory, mem_mask = self._memory({m: f})
                out.caption_logits[m] = self.decoder(
                    ids[:, :-1], memory, mem_mask, ids_mask[:, :-1]
                )
        if self.generators and "generate" in run and feats:
            out.flow = self._flow(batch, feats, out.fused)
        if self.classifier is not None and "classifier" in run:
            if out.fused is not None:
                out.logits = self.classifier(out.fused)
            out.modality_logits = {m: self.classifier(f.embed) for m, f in feats.items()}
        return out

    def _flow(
        self,
        batch: dict[str, Any],
        feats: dict[str, ModalityFeatures],
        fused: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Translation draws: every generated target from every other modality's embedding
        (and from the fused embedding when fusion ran); see :func:`models.generation.flow_terms`."""
        from models.generation import GenerationConfig, flow_terms

        gen = GenerationConfig.from_model(self.config)
        conds = {m: (f.embed, f.present) for m, f in feats.items()}
        if fused is not None:
            conds["fused"] = (fused, torch.stack([f.present for f in feats.values()]).any(0))
        return flow_terms(
            dict(self.generators.items()),
            batch,
            conds,
            detach=gen.detach_condition,
            repeats=gen.repeats,
        )

    @torch.no_grad()
    def generate(
        self,
        target: str,
        cond: torch.Tensor,
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> list[Any]:
        """Samples of ``target`` for ``(B, E)`` shared-space conditions (an embedding of any
        other modality, or a fused embedding), one seed per sample.

        Returns:
            ``B`` featurized items of ``target`` (the form its featurizer produces).

        Raises:
            KeyError: No generation head for ``target`` is loaded.
        """
        if target not in self.generators:
            raise KeyError(f"no generation head for {target!r} (loaded: {sorted(self.generators)})")
        head = self.generators[target]
        cond = F.normalize(cond.float(), dim=-1)
        return head.to_items(head.sample(cond, seeds, steps=steps, guidance=guidance))

    # ------------------------------------------------------------------ training helpers
    def freeze(self, *, encoders: bool = True, trunk_top_k: int | None = None) -> OmniModel:
        """Freeze policy for staged training.

        Args:
            encoders: Freeze (True) or unfreeze (False) every modality encoder.
            trunk_top_k: ``None`` leaves the trunk as is; ``k`` trains only the top ``k``
                trunk layers (and the final trunk norm if ``k > 0``); ``0`` freezes it all.

        Returns:
            ``self``.
        """
        for p in self.encoders.parameters():
            p.requires_grad_(not encoders)
        if trunk_top_k is not None and self.trunk is not None:
            n = len(self.trunk.layers)
            if trunk_top_k < 0:
                raise ValueError("trunk_top_k must be >= 0")
            for i, layer in enumerate(self.trunk.layers):
                for p in layer.parameters():
                    p.requires_grad_(i >= n - trunk_top_k)
            for p in self.trunk.norm.parameters():
                p.requires_grad_(trunk_top_k > 0)
        return self

    def unfreeze(self) -> OmniModel:
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    def parameter_groups(self, weight_decay: float = 0.05) -> list[dict[str, Any]]:
        """Trainable parameters split into decay / no-decay groups for AdamW
        (no decay on biases, norms, embeddings, position/modality/mask tokens, temperature).

        DeepSpeed's MoE needs expert parameters in groups of their own: see
        ``jobs.training.engine.moe_parameter_groups``."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() < 2 or leaf != "weight" or ".embed." in f".{name}":
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def compile_blocks(self, **compile_kwargs: Any) -> OmniModel:
        """``torch.compile`` the repeated blocks in place (regional compilation): each encoder
        block and each trunk layer (which runs on the packed tokens of every modality).

        Parameter names and the ``state_dict`` are unchanged (``nn.Module.compile``
        compiles in place), so checkpoints and exports are the same as an eager model's.
        Process-wide compiler settings for training live in
        ``jobs.training.engine.compile_model``.

        Returns:
            ``self``.
        """
        for enc in self.encoders.values():
            for blk in getattr(enc, "blocks", []):
                blk.compile(**compile_kwargs)
        for layer in self.trunk.layers:
            layer.compile(**compile_kwargs)
        return self

    def quantize_dynamic(self, *, inplace: bool = False) -> nn.Module:
        """INT8 dynamic quantization of every ``nn.Linear`` (experts included) for CPU
        inference; see :func:`models.quant.quantize_int8`."""
        from models.quant import quantize_int8

        return quantize_int8(self, inplace=inplace)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``model.safetensors`` + ``model_config.yaml`` (no pickle); see
        :func:`models.pretrained.save_pretrained`."""
        from models.pretrained import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        modalities: Iterable[str] | None = None,
        parts: Iterable[str] | None = None,
        *,
        map_location: str | torch.device = "cpu",
    ) -> OmniModel:
        """Rebuilds the model from an export directory, optionally only some branches; see
        :func:`models.pretrained.load_pretrained` (``parts=[]``: a serving replica)."""
        from models.pretrained import load_pretrained

        return load_pretrained(directory, modalities, parts, map_location=map_location)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def build_model(
    config: OmniConfig,
    *,
    modalities: Iterable[str] | None = None,
    parts: Iterable[str] | None = None,
) -> OmniModel:
    """Builds the parts named by ``config`` and injects them into :class:`OmniModel`.

    Args:
        config: The model config.
        modalities: Branches to build (default: ``config.modalities``).
        parts: Subset of :data:`PARTS` (default: all; ``decoder`` needs ``decoder_layers>0``,
            ``classifier`` needs ``num_classes>0``).
    """
    mods = list(config.modalities) if modalities is None else list(modalities)
    bad = [m for m in mods if m not in config.modalities]
    if bad:
        raise ValueError(f"modalities {bad} not in config.modalities {config.modalities}")
    parts_set = set(PARTS) if parts is None else set(parts)
    unknown = parts_set - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {list(PARTS)}")
    encoders = {m: build_encoder(m, config) for m in mods}
    model = OmniModel(
        config,
        encoders=encoders,
        # A head-only model (no branch, e.g. the serving fusion replica) needs no trunk.
        trunk=MoETrunk(config) if mods else None,
        adapters={m: Adapter(config) for m in mods},
        projections={m: ProjectionHead(config) for m in mods},
        fusion=GatedFusion(config) if "fusion" in parts_set else None,
        recon_heads=(
            {m: ReconHead(config, encoders[m].target_dim) for m in mods}
            if "recon" in parts_set
            else None
        ),
        decoder=TextDecoder(config) if "decoder" in parts_set and config.decoder_layers else None,
        classifier=(
            ClassifierHead(config) if "classifier" in parts_set and config.num_classes else None
        ),
        generators=build_generators(config, mods) if "generate" in parts_set else None,
    )
    # Linear/Embedding init (parameters such as positions are initialized where created).
    for name, module in model.named_modules():
        # Pretrained towers (encoder kind ``hf``) keep their weights; the generation heads
        # keep their own init (zero output / FiLM layers).
        if (
            isinstance(module, nn.Linear | nn.Embedding)
            and "ffn.moe" not in name
            and ".tower." not in f".{name}."
            and not name.startswith("generators.")
        ):
            _init_weights(module)
    for enc in encoders.values():  # input layers: fan-in init (see ModalityEncoder.stem_names)
        enc.reset_stem()
    return model


__all__ = [
    "CONFIG_NAME",
    "PARTS",
    "WEIGHTS_NAME",
    "ModalityFeatures",
    "OmniModel",
    "OmniOutput",
    "ReconOutput",
    "build_model",
]
