"""Audio encoder: patches of consecutive log-mel frames ``(B, T, F)`` (AST/SSAST-like)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized
from models.generation import GenSpace, register_space


@register_encoder("audio")
class AudioEncoder(ModalityEncoder):
    """Groups ``patch`` frames x all mel bins into one token; variable T via mask."""

    @dataclass
    class Config:
        """Section ``encoders.audio``.

        Attributes:
            bins: Feature bins F per frame (log-mel bins or MFCCs).
            max_frames: Longest T.
            patch: Frames per token.
        """

        bins: int = 40
        max_frames: int = 128
        patch: int = 8

        def __post_init__(self) -> None:
            for key in ("bins", "max_frames", "patch"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")

        @property
        def max_patches(self) -> int:
            return math.ceil(self.max_frames / self.patch)

    presets = {"base": {"patch": 4}}
    legacy_keys = {"audio_bins": "bins", "audio_max_frames": "max_frames", "audio_patch": "patch"}
    stem_names = ("proj",)

    @classmethod
    def sizes_for(cls, max_shape: Sequence[int]) -> dict:
        return {"max_frames": int(max_shape[0]), "bins": int(max_shape[1])}

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Config) -> tuple[int, ...]:
        return (section.max_frames, section.bins)

    def __init__(self, cfg: OmniConfig, section: Config | None = None) -> None:
        super().__init__(cfg, section)
        sec = self.section
        self.bins = sec.bins
        self.patch = sec.patch
        self.max_frames = sec.max_frames
        self.target_dim = sec.patch * sec.bins
        self.proj = nn.Linear(self.target_dim, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, sec.max_patches, cfg.d_model) * 0.02)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        x = self.input(batch)
        if x.dim() != 3 or x.shape[2] != self.bins:
            raise ValueError(f"audio must be (B, T, {self.bins}), got {tuple(x.shape)}")
        b, t, f = x.shape
        if t > self.max_frames:
            raise ValueError(f"audio has {t} frames, more than max_frames={self.max_frames}")
        frame_mask = batch.get(f"{self.modality}_mask")
        frame_mask = (
            torch.ones(b, t, dtype=torch.bool, device=x.device)
            if frame_mask is None
            else frame_mask.bool()
        )
        x = x.to(torch.float32) * frame_mask.unsqueeze(-1)  # padded frames are exactly zero
        pad = (-t) % self.patch
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            frame_mask = F.pad(frame_mask, (0, pad))
        n = (t + pad) // self.patch
        patches = x.reshape(b, n, self.patch * f)  # (B, N, P*F)
        mask = frame_mask.reshape(b, n, self.patch).any(-1)  # (B, N)
        return Tokenized(
            x=self.proj(self.as_params(patches)), pos=self.pos[:, :n], mask=mask, targets=patches
        )


@register_space("audio")
class AudioSpace(GenSpace):
    """Generation space of audio: normalized log-mel (T, F), T <= max_frames, padded with
    each bin's quietest value (so a generated clip ends in near-silence rather than in the
    utterance's mean); an MLP velocity net. Its classifier features are the padded frames as
    a ``(F, T)`` sequence (:meth:`probe_features`). Evaluated from images and from text by
    default."""

    eval_sources = ("image", "text")

    def from_batch(self, x, mask):
        x = x.float()
        b, t, f = x.shape
        tm = self.shape[0]
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if mask is None else mask
        valid = valid.bool()
        quiet = x.masked_fill(~valid[..., None], float("inf")).amin(1, keepdim=True)  # (B,1,F)
        quiet = torch.where(torch.isfinite(quiet), quiet, torch.zeros_like(quiet))
        z = torch.where(valid[..., None], x, quiet)
        if t < tm:
            z = torch.cat([z, quiet.expand(b, tm - t, f)], 1)
        return z[:, :tm], torch.ones(b, tm, f, device=x.device)

    def to_item(self, z):
        # Re-normalized per bin as the featurizer normalizes a decoded clip.
        z = z.float()
        z = (z - z.mean(0, keepdim=True)) / (z.std(0, unbiased=False, keepdim=True) + 1e-5)
        return z.cpu().numpy().astype(np.float16)

    def probe_features(self, items):
        """``(N, F, T)``: the padded log-mel frames, bins as channels. A spoken word sits
        anywhere in the clip and is said at many speeds, voices and languages (OmniDigits),
        so the evaluation reads it with its shift-invariant sequence classifier (a linear
        model on the flat frames: 0.83 held-out accuracy; on time-pooled bins: near chance)."""
        z = super().probe_features(items).reshape(len(items), *self.shape)
        return np.ascontiguousarray(z.transpose(0, 2, 1))

    def plot(self, ax, item):
        x = np.asarray(item, np.float32)
        ax.imshow(x.T, origin="lower", aspect="auto", cmap="magma")
