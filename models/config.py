"""``OmniConfig``: the typed description of one model; named sizes are data.

A size is an entry of :data:`MODEL_SIZES` (mirrored by ``configs/model/<name>.yaml``);
``OmniConfig.from_name("tiny", vocab_size=1024, num_classes=10)`` returns it with
overrides applied. Every export carries its ``model_config.yaml`` so that
``OmniModel.from_pretrained(dir)`` rebuilds exactly the same model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, from_dict, read_yaml, save_yaml, to_dict

#: Every modality the model knows, in the fixed order used for fusion gates.
ALL_MODALITIES: tuple[str, ...] = ("text", "image", "audio", "video", "pointcloud", "signal")


@dataclass
class OmniConfig:
    """Hyper-parameters of an :class:`~models.model.OmniModel`.

    Attributes:
        name: Size name this config was derived from (informational).
        modalities: Modalities with an encoder branch; also the order of fusion gates.
        d_model: Width ``d`` of encoders, trunk, adapters and fusion.
        n_heads: Attention heads everywhere.
        mlp_ratio: Hidden width of dense MLPs (encoders, decoder) as a multiple of ``d``.
        encoder_layers: Transformer layers inside each modality encoder.
        trunk_layers: Layers of the shared sparse-MoE trunk.
        num_experts: Experts per MoE layer.
        top_k: Experts each token is routed to.
        expert_hidden: Hidden width of one expert MLP (0 = ``mlp_ratio * d_model``).
        capacity_factor: Expert capacity = ``ceil(cf * tokens * k / experts)`` when dropping.
        dropless: If True no token is ever dropped (capacity ignored).
        moe_impl: ``native`` (grouped index_select/index_add), ``deepspeed``
            (``deepspeed.moe.layer.MoE``, expert parallel) or ``dense`` (plain MLP with
            ``top_k * expert_hidden`` hidden units: same active parameters, for comparisons).
        ep_size: Expert-parallel group size for ``moe_impl=deepspeed``.
        aux_loss_weight: Weight of the load-balancing loss (used by ``objectives.MoEAuxLoss``).
        z_loss_weight: Weight of the router z-loss.
        adapter_ratio: Bottleneck width of the per-modality adapters relative to ``d``.
        fusion_heads: Heads of the cross-modal attention in fusion.
        embed_dim: Size ``E`` of the shared (contrastive) embedding space.
        init_temperature: Initial InfoNCE temperature (``logit_scale = log(1/T)``).
        max_logit_scale: Clamp of ``logit_scale.exp()``.
        decoder_layers: Layers of the any-modality -> text decoder (0 disables it).
        num_classes: Classes of the classification head (0 disables it).
        dropout: Dropout everywhere (0 for the CPU demo).
        vocab_size, pad_id, bos_id, eos_id, mask_id: Text vocabulary (INTERFACES §1).
        max_text_len: Longest text sequence (positions).
        image_size, image_patch: Square image side and ViT patch side.
        image_stem: ``conv`` (log2(patch) stride-2 convolutions, the default: learns shapes
            in far fewer steps) or ``linear`` (the plain ViT patch embedding).
        audio_bins, audio_max_frames, audio_patch: Log-mel bins F, longest T, frames per patch.
        video_frames, video_size, video_patch, video_tubelet: Frames, side, spatial and
            temporal tubelet size.
        pointcloud_points, pointcloud_channels: Points N and channels C (3 or 6).
        pointcloud_groups, pointcloud_group_size: FPS centres and neighbours per group.
        signal_channels, signal_length, signal_patch: C, L and PatchTST patch length.
    """

    name: str = "custom"
    modalities: list[str] = field(default_factory=lambda: list(ALL_MODALITIES))
    d_model: int = 64
    n_heads: int = 4
    mlp_ratio: float = 2.0
    encoder_layers: int = 1
    trunk_layers: int = 2
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 0
    capacity_factor: float = 1.25
    dropless: bool = True
    moe_impl: str = "native"
    ep_size: int = 1
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    adapter_ratio: float = 0.5
    fusion_heads: int = 4
    embed_dim: int = 64
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    decoder_layers: int = 1
    num_classes: int = 0
    dropout: float = 0.0
    # text
    vocab_size: int = 1024
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    mask_id: int = 4
    max_text_len: int = 32
    # image
    image_size: int = 32
    image_patch: int = 8
    image_stem: str = "conv"
    # audio
    audio_bins: int = 40
    audio_max_frames: int = 128
    audio_patch: int = 8
    # video
    video_frames: int = 8
    video_size: int = 32
    video_patch: int = 16
    video_tubelet: int = 2
    # pointcloud
    pointcloud_points: int = 256
    pointcloud_channels: int = 3
    pointcloud_groups: int = 16
    pointcloud_group_size: int = 16
    # signal
    signal_channels: int = 3
    signal_length: int = 128
    signal_patch: int = 16

    def __post_init__(self) -> None:
        self.modalities = list(self.modalities)
        unknown = [m for m in self.modalities if m not in ALL_MODALITIES]
        if unknown:
            raise ConfigError(f"unknown modalities {unknown}; known: {list(ALL_MODALITIES)}")
        if self.d_model % self.n_heads or self.d_model % self.fusion_heads:
            raise ConfigError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"and fusion_heads={self.fusion_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.moe_impl not in ("native", "deepspeed", "dense"):
            raise ConfigError(f"moe_impl must be native|deepspeed|dense, got {self.moe_impl!r}")
        if self.num_experts % max(self.ep_size, 1):
            raise ConfigError(f"num_experts={self.num_experts} not divisible by ep_size")
        if self.capacity_factor <= 0:
            raise ConfigError("capacity_factor must be > 0")
        checks = {
            "image_size % image_patch": self.image_size % self.image_patch,
            "video_size % video_patch": self.video_size % self.video_patch,
            "video_frames % video_tubelet": self.video_frames % self.video_tubelet,
            "signal_length % signal_patch": self.signal_length % self.signal_patch,
        }
        bad = [k for k, v in checks.items() if v]
        if bad:
            raise ConfigError(f"sizes must divide evenly: {bad}")
        if self.image_stem not in ("conv", "linear"):
            raise ConfigError(f"image_stem must be conv|linear, got {self.image_stem!r}")
        if self.image_stem == "conv" and (
            self.image_patch < 2 or self.image_patch & (self.image_patch - 1)
        ):
            raise ConfigError(
                f"image_stem=conv needs a power-of-two image_patch, got {self.image_patch}"
            )
        if self.pointcloud_channels < 3:
            raise ConfigError("pointcloud_channels must be >= 3 (xyz first)")

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of one expert MLP."""
        return self.expert_hidden or int(self.mlp_ratio * self.d_model)

    @property
    def audio_max_patches(self) -> int:
        return math.ceil(self.audio_max_frames / self.audio_patch)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> OmniConfig:
        """Named size plus keyword overrides (unknown keys raise ``ConfigError``)."""
        if name not in MODEL_SIZES:
            raise ConfigError(f"unknown model size {name!r}; known: {sorted(MODEL_SIZES)}")
        data = dict(MODEL_SIZES[name])
        data.update(overrides)
        data.setdefault("name", name)
        return from_dict(cls, data, where=f"OmniConfig[{name}]")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniConfig:
        return from_dict(cls, data, where="OmniConfig")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> OmniConfig:
        """Reads ``model_config.yaml`` (or ``configs/model/<size>.yaml``)."""
        data = read_yaml(path)
        data.update(overrides)
        return from_dict(cls, data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save_yaml(self, path: str | Path) -> None:
        save_yaml(self, path)

    def replace(self, **changes: Any) -> OmniConfig:
        return dataclasses.replace(self, **changes)


#: Named sizes (the YAML files in ``configs/model/`` mirror these; a test checks they agree).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    # Tests: < 2M parameters, forward+backward of a batch of 8 well under a second on CPU.
    "tiny": dict(
        d_model=64,
        n_heads=4,
        mlp_ratio=2.0,
        encoder_layers=1,
        trunk_layers=2,
        num_experts=4,
        top_k=2,
        expert_hidden=128,
        embed_dim=64,
        decoder_layers=1,
        fusion_heads=4,
    ),
    # The CPU demo: three short stages in ~12 min on 2 cores.
    "small": dict(
        d_model=128,
        n_heads=4,
        mlp_ratio=2.0,
        encoder_layers=1,
        trunk_layers=3,
        num_experts=8,
        top_k=2,
        expert_hidden=256,
        embed_dim=128,
        decoder_layers=1,
        fusion_heads=4,
    ),
    # GPU: d=768, 12 MoE trunk layers with 8 experts.
    "base": dict(
        d_model=768,
        n_heads=12,
        mlp_ratio=4.0,
        encoder_layers=2,
        trunk_layers=12,
        num_experts=8,
        top_k=2,
        expert_hidden=3072,
        embed_dim=512,
        decoder_layers=2,
        fusion_heads=12,
        image_patch=4,
        video_patch=8,
        audio_patch=4,
        signal_patch=8,
        pointcloud_groups=32,
        pointcloud_group_size=16,
    ),
}
