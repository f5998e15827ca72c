"""A throwaway ``depth`` modality (depth maps), defined outside every shared file.

It is what a contributor writes to add a modality: a record, a featurizer, an encoder and a
serve spec. :func:`register` adds all four at run time and :func:`unregister` removes them,
so ``tests/test_modality_contract.py`` can prove that nothing else needs editing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import ConfigError
from common.modalities import Modality, register_modality, unregister_modality
from models.encoders.base import ModalityEncoder, Tokenized
from pipelines.featurize.base import Featurizer, SampleError
from serve.modalities.base import ModalitySpec

NAME = "depth"
RECORD = Modality(NAME, "float16", 3)  # (H, W, 1) metres, resized


class DepthFeaturizer(Featurizer):
    """``.npy`` depth map (H, W) -> float16 (size, size, 1), nearest-neighbour resize."""

    @dataclass
    class Config:
        size: int = 16
        max_side: int = 4096

    suffixes = (".npy",)

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        return ".npy" if data[:6] == b"\x93NUMPY" else None

    def output_shape(self) -> tuple[int, ...]:
        return (self.section.size, self.section.size, 1)

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[bytes, str]:
        # A tilted plane: the tilt direction is the label.
        yy, xx = np.mgrid[0:24, 0:24] / 24.0
        angle = 2 * np.pi * label / 10
        depth = 2.0 + np.cos(angle) * xx + np.sin(angle) * yy + 0.01 * rng.standard_normal(xx.shape)
        buf = io.BytesIO()
        np.save(buf, depth.astype(np.float32), allow_pickle=False)
        return buf.getvalue(), ".npy"

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any malformed file
            raise SampleError("decode_error", f"{type(e).__name__}: {e}") from e
        return self.from_array(arr)

    def from_array(self, array: np.ndarray, **_: Any) -> np.ndarray:
        a = np.asarray(array, dtype=np.float64)
        if a.ndim != 2:
            raise SampleError("bad_shape", f"depth map shape {a.shape}, want (H, W)")
        if max(a.shape) > self.section.max_side:
            raise SampleError("too_large", f"depth map {a.shape}")
        if not np.isfinite(a).all():
            raise SampleError("non_finite", "depth map has NaN or Inf")
        s = self.section.size
        rows = np.arange(s) * a.shape[0] // s
        cols = np.arange(s) * a.shape[1] // s
        return a[rows][:, cols, None].astype(np.float16)


class DepthEncoder(ModalityEncoder):
    """Linear patch embedding of ``(B, S, S, 1)`` depth maps."""

    @dataclass
    class Config:
        size: int = 16
        patch: int = 4

        def __post_init__(self) -> None:
            if self.size % self.patch:
                raise ConfigError("size % patch must be 0")

    stem_names = ("proj",)

    @classmethod
    def sizes_for(cls, max_shape: Sequence[int]) -> dict:
        return {"size": int(max_shape[0])}

    @classmethod
    def input_shape(cls, cfg: Any, section: Config) -> tuple[int, ...]:
        return (section.size, section.size, 1)

    def __init__(self, cfg: Any, section: Config | None = None) -> None:
        super().__init__(cfg, section)
        p, n = self.section.patch, (self.section.size // self.section.patch) ** 2
        self.target_dim = p * p
        self.proj = nn.Linear(p * p, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.d_model) * 0.02)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        x = self.input(batch).to(torch.float32)  # (B, S, S, 1)
        b, s, p = x.shape[0], self.section.size, self.section.patch
        patches = x.reshape(b, s // p, p, s // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=x.device)
        return Tokenized(
            x=self.proj(self.as_params(patches)), pos=self.pos, mask=mask, targets=patches
        )


class DepthSpec(ModalitySpec):
    """Depth: a base64 ``.npy`` file or an (H, W) JSON array."""


def register() -> None:
    """Adds the record and the three registered classes."""
    from models.encoders import register_encoder
    from pipelines.featurize import register as register_featurizer
    from serve.modalities import register_spec

    register_modality(RECORD)
    register_featurizer(NAME)(DepthFeaturizer)
    register_encoder(NAME)(DepthEncoder)
    register_spec(NAME)(DepthSpec)


def unregister() -> None:
    """Removes everything :func:`register` added."""
    from models.encoders import ENCODERS
    from pipelines.featurize import FEATURIZERS
    from serve.modalities import unregister_spec

    FEATURIZERS.pop(NAME, None)
    ENCODERS.pop(NAME, None)
    unregister_spec(NAME)
    unregister_modality(NAME)
