"""The shared trunk: a stack of pre-LN self-attention + MoE FFN blocks over the packed
tokens of every modality in the batch (see :mod:`models.packing`, :mod:`models.moe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from models.config import OmniConfig
from models.layers import Attention
from models.moe import DeepSpeedMoEFFN, MoEStats, build_ffn
from models.packing import TokenPacking, packed_attention


class TrunkBlock(nn.Module):
    """Pre-LN self-attention + MoE FFN over packed tokens (padding is never computed)."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, cfg.n_heads, dropout=cfg.dropout)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = build_ffn(cfg)

    def forward(self, h: torch.Tensor, pack: TokenPacking) -> tuple[torch.Tensor, MoEStats]:
        """``h`` ``(T, d)`` packed tokens -> ``(T, d)`` and stats with per-item
        ``counts (S, E)`` and ``dropped (S,)``.

        Attention stays within each sequence; the MoE FFN runs once over all tokens of
        all items (larger, more efficient expert GEMMs).
        """
        h = h + packed_attention(self.attn, self.norm1(h), pack)
        x = self.norm2(h)
        if isinstance(self.ffn, DeepSpeedMoEFFN):  # no per-token routing stats: per item
            ys, per = [], []
            for part in x.split(pack.sizes):
                y_i, s_i = self.ffn(part)
                ys.append(y_i)
                per.append(s_i)
            y = torch.cat(ys)
            stats = MoEStats(
                aux=torch.stack([s.aux for s in per]).mean(),
                z=torch.stack([s.z for s in per]).mean(),
                counts=torch.stack([s.counts for s in per]),
                dropped=torch.stack([s.dropped for s in per]),
            )
        else:
            y, stats = self.ffn(x, pack.segments, pack.num_segments)
        # The residual stream keeps its dtype (under autocast the FFN may return another).
        return h + y.to(h.dtype), stats


@dataclass
class TrunkStats:
    """Routing statistics of one trunk pass (one modality).

    Attributes:
        aux: Mean balance loss over layers.
        z: Mean z-loss over layers.
        counts: ``(L, E)`` assignments per layer and expert.
        dropped: ``(L,)`` dropped assignments per layer.
    """

    aux: torch.Tensor
    z: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor


class MoETrunk(nn.Module):
    """Stack of :class:`TrunkBlock`, shared by every modality."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TrunkBlock(cfg) for _ in range(cfg.trunk_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        # Activation checkpointing: while training, each layer keeps only its inputs and is
        # recomputed in the backward pass (about a third more trunk compute for a fraction
        # of the activation memory, so larger micro-batches fit on a GPU).
        self.activation_checkpointing = False
        # Packed attention through the variable-length flash kernel where it applies (CUDA,
        # bf16/fp16); False forces the portable padded path (for comparisons).
        self.varlen_attention = True

    def _run(self, fn, *args):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, TrunkStats]:
        """``x`` ``(B, N, d)``, ``mask`` ``(B, N)`` -> ``(B, N, d)`` (zeros at padded
        positions) and :class:`TrunkStats`."""
        ((y, stats),) = self.forward_many([(x, mask)])
        return y, stats

    def forward_many(
        self, items: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, TrunkStats]]:
        """Runs several modalities' token sets in one packed pass (see
        :class:`TokenPacking`); each item's valid tokens get the results of a separate
        :meth:`forward` (dropless routing).

        Args:
            items: ``[(x (B_i, N_i, d), mask (B_i, N_i))]``.

        Returns:
            ``[(y_i (B_i, N_i, d), TrunkStats_i)]`` with zeros at padded positions;
            ``aux``/``z`` are the joint (whole-pass) values, ``counts (L, E)`` and
            ``dropped (L,)`` are per item.
        """
        if not items:
            return []
        for i, (x, m) in enumerate(items):
            if x.dim() != 3 or tuple(m.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"trunk item {i}: tokens {tuple(x.shape)} and mask {tuple(m.shape)} do not "
                    "match; expected x (B, N, d) and mask (B, N)"
                )
        xs = [x for x, _ in items]
        pack = TokenPacking.build(
            [m for _, m in items], device=xs[0].device, varlen=self.varlen_attention
        )
        h = pack.pack(xs)
        stats = []
        for layer in self.layers:
            h, s = self._run(layer, h, pack)
            stats.append(s)
        ys = pack.unpack(self.norm(h))
        aux = torch.stack([s.aux for s in stats]).mean()
        z = torch.stack([s.z for s in stats]).mean()
        counts = torch.stack([s.counts for s in stats], 1)  # (S, L, E)
        dropped = torch.stack([s.dropped for s in stats], 1)  # (S, L)
        return [
            (y, TrunkStats(aux=aux, z=z, counts=counts[i], dropped=dropped[i]))
            for i, y in enumerate(ys)
        ]
