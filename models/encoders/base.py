"""The uniform encoder contract.

Every modality encoder turns its featurized batch into tokens in two steps:

1. ``tokenize(batch)`` -> :class:`Tokenized`: patch/token embeddings ``(B, N, d)``
   (before positions), position embeddings, the validity mask ``(B, N)`` and the
   reconstruction targets of each token (ids or raw patch values) for masked modelling;
2. ``encode(...)`` adds positions and the modality embedding, optionally replaces a random
   subset of tokens by a learned ``[MASK]`` embedding, and runs a small transformer.

``forward(batch) -> (tokens[B, N, d], mask[B, N])`` is the contract the rest of the model
relies on; ``encode(batch, mask_ratio=...)`` additionally returns which tokens were masked
and their targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from common.modalities import get_modality
from models.config import OmniConfig
from models.layers import Block


@dataclass
class Tokenized:
    """Output of :meth:`ModalityEncoder.tokenize`.

    Attributes:
        x: Token/patch embeddings ``(B, N, d)`` without positions.
        pos: Position embeddings broadcastable to ``(B, N, d)``.
        mask: ``(B, N)`` bool, True = real token.
        targets: What masked modelling reconstructs: ``(B, N)`` int64 ids (``tokens``),
            ``(B, N, P)`` float patch values (``patches``) or ``(B, N, K*3)`` local point
            coordinates (``points``).
    """

    x: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor


@dataclass
class EncoderOutput:
    """Output of :meth:`ModalityEncoder.encode`.

    Attributes:
        tokens: ``(B, N, d)``.
        mask: ``(B, N)`` bool, True = real token.
        masked: ``(B, N)`` bool, True = replaced by ``[MASK]`` (None without masking).
        targets: Reconstruction targets (see :class:`Tokenized`), None without masking.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    masked: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def random_token_mask(mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Picks ``round(ratio * n_valid)`` valid tokens per row (at least one, never all).

    Args:
        mask: ``(B, N)`` bool validity.
        ratio: Fraction in (0, 1).

    Returns:
        ``(B, N)`` bool, True = masked; only valid positions are ever chosen.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {ratio}")
    n_valid = mask.sum(1)  # (B,)
    n_mask = (n_valid.to(torch.float32) * ratio).round().long()
    # Keep at least one visible and one masked token when a row has >= 2 tokens.
    n_mask = torch.minimum(n_mask.clamp_min(1), (n_valid - 1).clamp_min(0))
    noise = torch.rand(mask.shape, device=mask.device)
    noise = noise.masked_fill(~mask, 2.0)  # invalid positions sort last
    rank = noise.argsort(1).argsort(1)  # (B, N) rank of each position
    return (rank < n_mask[:, None]) & mask


class ModalityEncoder(nn.Module):
    """Base class: modality embedding, ``[MASK]`` token and a small transformer.

    Subclasses set ``target_kind`` (``tokens`` | ``patches`` | ``points``) and
    ``target_dim``, implement :meth:`tokenize`, and declare their section of
    ``OmniConfig.encoders``: ``Config`` (a dataclass validating itself), ``presets``,
    ``legacy_keys``, :meth:`sizes_for` and :meth:`input_shape`. ``modality`` is set by
    ``register_encoder``.
    """

    @dataclass
    class Config:
        """This encoder's section of ``OmniConfig.encoders`` (none for the base class)."""

    #: Named model size -> the section fields that differ from ``Config``'s defaults.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Flat key of an old ``model_config.yaml`` -> field of ``Config``.
    legacy_keys: ClassVar[dict[str, str]] = {}

    modality: str = ""
    target_kind: str = "patches"
    #: Attribute names of the input layers (patch/point embeddings). They keep PyTorch's
    #: fan-in scaled init: the 0.02 init of the transformer layers makes the first tokens
    #: of low-dimensional inputs (3-D points, short patches) nearly input-independent, and
    #: a from-scratch run then spends its first hundreds of steps near a collapsed space.
    stem_names: tuple[str, ...] = ()

    def __init__(self, cfg: OmniConfig, section: Any = None) -> None:
        super().__init__()
        self.section = self.Config() if section is None else section
        d = cfg.d_model
        self.d_model = d
        self.target_dim = 0
        self.modality_embed = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        hidden = int(cfg.mlp_ratio * d)
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, hidden, dropout=cfg.dropout) for _ in range(cfg.encoder_layers)
        )
        self.norm = nn.LayerNorm(d)

    # -- the section ----------------------------------------------------------------
    @classmethod
    def sizes_for(cls, max_shape: Sequence[int]) -> dict[str, Any]:
        """Section fields fixed by the featurizer's largest item shape (its
        ``max_output_shape()``), e.g. ``(32, 32, 3)`` -> ``{"size": 32}``."""
        return {}

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Any) -> tuple[int, ...]:
        """The largest featurized item this encoder takes (the inverse of :meth:`sizes_for`)."""
        raise NotImplementedError(f"{cls.__name__}.input_shape")

    @classmethod
    def random_item(cls, cfg: OmniConfig, section: Any, rng: np.random.Generator) -> np.ndarray:
        """A random featurized item (smoke tests, benchmarks), derived from the modality's
        record: its dtype, and a random length on the varying axis of a masked modality."""
        rec = get_modality(cls.modality)
        shape = list(cls.input_shape(cfg, section))
        if rec.masked:
            n = shape[rec.var_axis]
            shape[rec.var_axis] = int(rng.integers(max(1, n // 2), n + 1))
        dtype = rec.np_dtype
        if dtype == np.uint8:
            return rng.integers(0, 256, shape, dtype=np.uint8)
        if np.issubdtype(dtype, np.integer):
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.standard_normal(shape).astype(dtype)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        raise NotImplementedError

    def as_params(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the parameters' dtype: featurization runs in fp32, the stem then takes it
        in whatever precision the model is held (bf16 under DeepSpeed on a GPU)."""
        return x.to(self.modality_embed.dtype)

    def stem_parameters(self) -> list[nn.Parameter]:
        """The input layers' parameters (``stem_names`` may name modules or parameters):
        the layers that take the fp32 featurized tensors."""
        out: list[nn.Parameter] = []
        for name in self.stem_names:
            part = getattr(self, name)
            out.extend([part] if isinstance(part, nn.Parameter) else part.parameters())
        return out

    def reset_stem(self) -> None:
        """Fan-in (PyTorch default) init of the Linear/Conv layers named by ``stem_names``
        (parameters named there keep the init their encoder gave them)."""
        for name in self.stem_names:
            part = getattr(self, name)
            if isinstance(part, nn.Parameter):
                continue
            for mod in part.modules():
                if isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                    mod.reset_parameters()

    def input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The modality's tensor from ``batch`` with a clear error when absent."""
        if self.modality not in batch:
            raise KeyError(f"batch has no {self.modality!r} entry (keys: {sorted(batch)})")
        return batch[self.modality]

    def encode(
        self,
        batch: dict[str, torch.Tensor],
        *,
        mask_ratio: float | None = None,
        present: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Tokenizes, masks (optionally) and encodes.

        Args:
            batch: Collated batch (``models.data.collate``).
            mask_ratio: If set, this fraction of each row's valid tokens is replaced by
                the learned ``[MASK]`` embedding and returned for reconstruction.
            present: ``(B,)`` bool; rows without the modality get an all-False mask.

        Returns:
            :class:`EncoderOutput` with tokens ``(B, N, d)`` and mask ``(B, N)``.
        """
        tok = self.tokenize(batch)
        x, mask = tok.x, tok.mask
        if present is not None:
            mask = mask & present[:, None]
        masked = None
        if mask_ratio:
            masked = random_token_mask(mask, mask_ratio)
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + tok.pos + self.modality_embed
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        return EncoderOutput(
            tokens=x,
            mask=mask,
            masked=masked,
            targets=tok.targets if masked is not None else None,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The uniform contract: featurized batch -> ``(tokens (B, N, d), mask (B, N))``."""
        out = self.encode(batch)
        return out.tokens, out.mask


def standardize(x: torch.Tensor, channel_dim: int = -1, eps: float = 1e-3) -> torch.Tensor:
    """Per-sample, per-channel standardization (zero mean, unit variance over every axis
    but the batch and ``channel_dim``).

    Clips and images are mostly flat background; without this the background's mean
    dominates every patch embedding and all inputs start out looking alike.
    """
    x = x.to(torch.float32)
    dims = tuple(d for d in range(1, x.dim()) if d != channel_dim % x.dim())
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)
