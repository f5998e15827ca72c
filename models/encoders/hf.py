"""Encoder kind ``hf``: a pretrained ``transformers`` tower + a connector into the trunk.

Selected per modality in the model config, like any encoder section::

    encoders:
      text: {kind: hf, tower: /path/to/all-MiniLM-L6-v2, train: frozen}

(training derives the section from ``features.<m>.tower``, so setting the tower once in the
data config is enough). Serves text (BERT/MiniLM/XLM-R-style), image (ViT/CLIP-vision/
DINOv2/SigLIP-style), audio (wav2vec2/HuBERT: raw waveform; Whisper-encoder/AST: mel
features) and video (the image tower per frame, then temporal mean pooling per token).

Forward: the featurized batch (the tower's own processor produced it, see
``pipelines/featurize/_towers.py``) -> tower -> last hidden states ``(B, N, h)`` ->
connector ``LayerNorm(h) -> Linear(h, d)`` -> ``+ modality embedding`` -> ``LayerNorm(d)``
-> ``(B, N, d)`` tokens for the shared MoE trunk. A frozen tower may instead read features
cached in the shards (``batch[f"{m}__tower"]``, computed once in prepare).

What trains is ``train`` (per stage: ``<stage>.towers``): ``frozen`` (only the connector),
``last_k`` (also the last ``last_k`` transformer layers) or ``lora`` (``peft`` LoRA adapters
on ``lora_targets``, injected at build so that the weights keep their names). Masked
modelling on a tower regresses the tower's own output features at the masked positions
(target ``(B, N, h)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from common.config import ConfigError
from common.towers import (
    CACHE_SUFFIX,
    TOWER_MODALITIES,
    TowerError,
    check_tower,
    load_config,
    load_model,
    load_processor,
    resolve_ref,
    tower_module,
    tower_revision,
)
from models.config import OmniConfig
from models.encoders import register_encoder_kind
from models.encoders.base import EncoderOutput, ModalityEncoder, random_token_mask

TRAIN_MODES = ("frozen", "last_k", "lora")
#: Attention projections LoRA adapts when ``lora_targets`` is empty (the first that exist).
_LORA_DEFAULTS = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"), ("qkv",))


def transformer_layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The tower's stack of transformer layers: the longest ``nn.ModuleList`` whose name
    ends in ``layer``/``layers`` (``encoder.layer`` of BERT/ViT, ``encoder.layers`` of
    wav2vec2/CLIP)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in module.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise TowerError(f"{type(module).__name__}: no transformer layer list found for last_k")
    return best


@register_encoder_kind("hf")
class HFTowerEncoder(ModalityEncoder):
    """A ``transformers`` tower and its connector (see module docstring)."""

    @dataclass
    class Config:
        """Section ``encoders.<m>`` of kind ``hf``.

        Attributes:
            kind: ``hf``.
            tower: Local Hugging Face directory or hub id (``from_pretrained``); a relative
                path is taken against the export directory that holds it.
            revision: Content hash of the tower (``common.towers.tower_revision``) the model
                was trained with; a different tower is refused. Empty: not checked.
            train: Default of every stage: ``frozen``, ``last_k`` or ``lora``.
            last_k: Transformer layers trained with ``train=last_k``.
            lora_r, lora_alpha, lora_dropout: LoRA rank, scale and dropout.
            lora_targets: Module names LoRA adapts (empty: the attention query/value).
            hidden: Width of the tower's tokens the connector takes (0: the tower's).
            max_len: Longest item on the varying axis (text ids, audio samples/frames).
            max_tokens: Tokens the connector takes at most (0: not checked).
            size: Image/video side of the processor's output.
            num_frames: Video frames.
            feature_size: Audio features per step (1 for raw waveform towers).
            input_name: Audio input of the tower (``input_values`` | ``input_features``).
            temporal: Video: how frame tokens are pooled over time (``mean``).
        """

        kind: str = "hf"
        tower: str = ""
        revision: str = ""
        train: str = "frozen"
        last_k: int = 1
        lora_r: int = 8
        lora_alpha: int = 16
        lora_dropout: float = 0.0
        lora_targets: list[str] = field(default_factory=list)
        hidden: int = 0
        max_len: int = 0
        max_tokens: int = 0
        size: int = 0
        num_frames: int = 0
        feature_size: int = 0
        input_name: str = "input_values"
        temporal: str = "mean"

        def __post_init__(self) -> None:
            if self.kind != "hf":
                raise ConfigError(f"kind must be 'hf', got {self.kind!r}")
            if not self.tower:
                raise ConfigError("tower: a local Hugging Face directory or hub id is required")
            if self.train not in TRAIN_MODES:
                raise ConfigError(f"train must be one of {TRAIN_MODES}, got {self.train!r}")
            if self.last_k < 0 or self.lora_r < 1:
                raise ConfigError("last_k must be >= 0 and lora_r >= 1")
            if self.temporal != "mean":
                raise ConfigError(f"temporal must be 'mean', got {self.temporal!r}")
            if self.input_name not in ("input_values", "input_features"):
                raise ConfigError("input_name must be input_values|input_features")

    kind_modalities = TOWER_MODALITIES
    target_kind = "patches"

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Config) -> tuple[int, ...]:
        m = cls._modality_of(section)
        if m == "text":
            return (section.max_len,)
        if m == "image":
            return (section.size, section.size, 3)
        if m == "video":
            return (section.num_frames, section.size, section.size, 3)
        return (section.max_len, section.feature_size)

    @staticmethod
    def _modality_of(section: Config) -> str:
        if section.num_frames:
            return "video"
        if section.size:
            return "image"
        if section.feature_size:
            return "audio"
        return "text"

    @classmethod
    def random_item(cls, cfg: OmniConfig, section: Config, rng: np.random.Generator) -> np.ndarray:
        m = cls._modality_of(section)
        shape = list(cls.input_shape(cfg, section))
        if m == "text":
            n = int(rng.integers(3, max(4, section.max_len) + 1))
            return rng.integers(0, 100, n).astype(np.int32)
        if m in ("image", "video"):
            return rng.integers(0, 256, shape, dtype=np.uint8)
        shape[0] = int(rng.integers(max(1, shape[0] // 2), shape[0] + 1))
        return rng.standard_normal(shape).astype(np.float16)

    def __init__(self, cfg: OmniConfig, section: Config, *, modality: str) -> None:
        nn.Module.__init__(self)
        self.modality = modality
        self.section = section
        d = self.d_model = cfg.d_model
        ref = self.ref = resolve_ref(section.tower)
        tcfg = load_config(ref)
        info = check_tower(ref, modality, tcfg)
        h = info["hidden"]
        if section.hidden and section.hidden != h:
            raise TowerError(
                f"tower {ref}: hidden size {h} does not fit the connector, which takes "
                f"{section.hidden} (encoders.{modality}.hidden)"
            )
        if modality == "text" and section.max_len > info["max_len"]:
            raise TowerError(
                f"tower {ref}: takes at most {info['max_len']} tokens, the connector is sized "
                f"for {section.max_len} (features.text.max_len)"
            )
        if info.get("tokens") and section.max_tokens and info["tokens"] > section.max_tokens:
            raise TowerError(
                f"tower {ref}: gives {info['tokens']} tokens per item, the connector takes at "
                f"most {section.max_tokens} (encoders.{modality}.max_tokens)"
            )
        if section.revision and section.revision != tower_revision(ref):
            raise TowerError(
                f"tower {ref}: revision {tower_revision(ref)} differs from {section.revision} "
                f"that this model was trained with (encoders.{modality}.revision)"
            )
        self.hidden = h
        self.target_dim = h
        if modality in ("image", "video"):
            proc = load_processor(ref, modality)
            mean = np.asarray(getattr(proc, "image_mean", None) or [0.0, 0.0, 0.0], np.float32)
            std = np.asarray(getattr(proc, "image_std", None) or [1.0, 1.0, 1.0], np.float32)
            if not getattr(proc, "do_normalize", True):
                mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
            scale = (
                float(getattr(proc, "rescale_factor", 1 / 255))
                if getattr(proc, "do_rescale", True)
                else 1.0
            )
            self.register_buffer("pix_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pix_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
            self.pix_scale = scale
        self.tower = tower_module(load_model(ref), modality)
        self.lora = section.train == "lora"
        if self.lora:
            self._inject_lora()
        self.connector = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, d))
        self.modality_embed = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList()  # the tower replaces the small transformer
        self.norm = nn.LayerNorm(d)
        self.set_tower_training(section.train)

    # -- what trains -------------------------------------------------------------------
    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = list(self.section.lora_targets)
        if not targets:
            leaves = {n.rsplit(".", 1)[-1] for n, _ in self.tower.named_modules()}
            targets = next((list(t) for t in _LORA_DEFAULTS if set(t) <= leaves), [])
            if not targets:
                raise TowerError(
                    f"tower {self.ref}: no attention query/value projections found for LoRA; "
                    f"set encoders.{self.modality}.lora_targets"
                )
        conf = LoraConfig(
            r=self.section.lora_r,
            lora_alpha=self.section.lora_alpha,
            lora_dropout=self.section.lora_dropout,
            target_modules=targets,
        )
        self.tower = inject_adapter_in_model(conf, self.tower)

    def connector_parameters(self) -> list[nn.Parameter]:
        """What trains in every mode: connector, modality embedding, [MASK], output norm."""
        return [
            *self.connector.parameters(),
            self.modality_embed,
            self.mask_token,
            *self.norm.parameters(),
        ]

    def set_tower_training(self, mode: str) -> None:
        """``requires_grad`` of the tower for ``mode`` (the connector always trains).

        Raises:
            ValueError: unknown mode, or ``lora`` on a tower built without adapters.
        """
        if mode not in TRAIN_MODES:
            raise ValueError(f"tower training mode must be one of {TRAIN_MODES}, got {mode!r}")
        if mode == "lora" and not self.lora:
            raise ValueError(
                f"encoders.{self.modality}: a stage asks for lora but the tower was built "
                "without adapters (set encoders.<m>.train: lora)"
            )
        for name, p in self.tower.named_parameters():
            p.requires_grad_(mode == "lora" and "lora_" in name)
        if mode == "last_k" and self.section.last_k > 0:
            _, layers = transformer_layers(self.tower)
            for layer in list(layers)[-self.section.last_k :]:
                for name, p in layer.named_parameters():
                    p.requires_grad_("lora_" not in name)
        for p in self.connector_parameters():
            p.requires_grad_(True)
        self.mode = mode

    def tower_trainable(self) -> bool:
        return any(p.requires_grad for p in self.tower.parameters())

    def train(self, mode: bool = True) -> HFTowerEncoder:
        super().train(mode)
        if not self.tower_trainable():
            self.tower.eval()  # a frozen tower never runs dropout
        return self

    def stem_parameters(self) -> list[nn.Parameter]:
        return list(self.connector.parameters())

    def reset_stem(self) -> None:
        self.connector[1].reset_parameters()

    # -- forward -----------------------------------------------------------------------
    def run_tower(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower on the featurized batch -> ``(features (B, N, h), mask (B, N))``."""
        m = self.modality
        x = self.input(batch)
        dtype = next(self.tower.parameters()).dtype
        if m == "text":
            ids = x.long()
            mask = batch.get(f"{m}_mask")
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            out = self.tower(input_ids=ids, attention_mask=mask.long())
            return out.last_hidden_state, mask
        if m in ("image", "video"):
            frames = x.reshape(-1, *x.shape[-3:])  # (B*F, H, W, 3)
            pix = frames.permute(0, 3, 1, 2).to(torch.float32) * self.pix_scale
            pix = ((pix - self.pix_mean) / self.pix_std).to(dtype)
            hs = self.tower(pixel_values=pix).last_hidden_state  # (B*F, N, h)
            if m == "video":
                hs = hs.reshape(x.shape[0], x.shape[1], *hs.shape[1:]).mean(1)  # temporal
            return hs, torch.ones(hs.shape[:2], dtype=torch.bool, device=hs.device)
        # audio: (B, T, F)
        amask = batch.get(f"{m}_mask")
        if self.section.input_name == "input_features":
            hs = self.tower(input_features=x.to(dtype).transpose(1, 2)).last_hidden_state
            return hs, torch.ones(hs.shape[:2], dtype=torch.bool, device=hs.device)
        wave = x[..., 0].to(dtype)  # (B, T)
        amask = (
            torch.ones(wave.shape, dtype=torch.bool, device=wave.device)
            if amask is None
            else amask.bool()
        )
        hs = self.tower(input_values=wave, attention_mask=amask.long()).last_hidden_state
        lengths = amask.sum(1)
        if hasattr(self.tower, "_get_feat_extract_output_lengths"):
            lengths = self.tower._get_feat_extract_output_lengths(lengths)
        steps = torch.arange(hs.shape[1], device=hs.device)[None, :]
        return hs, steps < lengths.clamp_min(1)[:, None].to(hs.device)

    def tower_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached features when the batch has them and the tower is frozen, else the tower
        (without autograd when nothing in it trains)."""
        key = f"{self.modality}{CACHE_SUFFIX}"
        trainable = self.tower_trainable()
        if key in batch and not trainable:
            feats = batch[key]
            mask = batch.get(f"{key}_mask")
            if mask is None:
                mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            return feats, mask.bool()
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.run_tower(batch)

    def encode(
        self,
        batch: dict[str, torch.Tensor],
        *,
        mask_ratio: float | None = None,
        present: torch.Tensor | None = None,
    ) -> EncoderOutput:
        feats, mask = self.tower_features(batch)
        if present is not None:
            mask = mask & present[:, None].to(mask.device)
        x = self.connector(feats.to(self.modality_embed.dtype))  # (B, N, d)
        masked = None
        if mask_ratio:
            masked = random_token_mask(mask, mask_ratio)
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = self.norm(x + self.modality_embed)
        return EncoderOutput(
            tokens=x,
            mask=mask,
            masked=masked,
            targets=feats.detach().float() if masked is not None else None,
        )
