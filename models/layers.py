"""Small building blocks shared by encoders, trunk, fusion and decoder.

Attention is written with ``nn.Linear`` projections and
``F.scaled_dot_product_attention`` (not ``nn.MultiheadAttention``) so that dynamic INT8
quantization covers every projection and padded keys are masked explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions.

    Args:
        x: ``(B, N, d)``.
        mask: ``(B, N)`` bool, True = valid.

    Returns:
        ``(B, d)``; rows with no valid position are zeros.
    """
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def sdpa_key_mask(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A key padding mask as SDPA takes it.

    Args:
        key_mask: ``(B, Nk)`` bool, True = may be attended.

    Returns:
        ``(B, 1, 1, Nk)`` attention mask and ``(B,)`` whether a row has any valid key. A row
        without one would give NaN, so it may see key 0 instead: callers zero or drop its
        outputs.
    """
    any_key = key_mask.any(-1)
    safe = key_mask.clone()
    safe[:, 0] |= ~any_key
    return safe[:, None, None, :], any_key


class Attention(nn.Module):
    """Multi-head (self or cross) attention with a key padding mask."""

    def __init__(self, dim: int, n_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attends ``x`` to ``context`` (itself when None).

        Args:
            x: Queries ``(B, Nq, d)``.
            context: Keys/values ``(B, Nk, d)``; defaults to ``x``.
            key_mask: ``(B, Nk)`` bool, True = may be attended. Rows with no valid key
                produce zeros (instead of SDPA's NaN).
            causal: Causal mask (self-attention only).

        Returns:
            ``(B, Nq, d)``.
        """
        ctx = x if context is None else context
        b, nq, d = x.shape
        nk = ctx.shape[1]
        h = self.n_heads
        q = self.q(x).view(b, nq, h, d // h).transpose(1, 2)  # (B, h, Nq, dh)
        k, v = self.kv(ctx).view(b, nk, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, Nk, dh)
        attn_mask = None
        any_key = None
        if key_mask is not None:  # rows without any valid key are zeroed below
            attn_mask, any_key = sdpa_key_mask(key_mask)
        if causal:
            tri = torch.ones(nq, nk, dtype=torch.bool, device=x.device).tril()
            attn_mask = tri if attn_mask is None else attn_mask & tri
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.proj(out.transpose(1, 2).reshape(b, nq, d))
        if any_key is not None:
            out = out * any_key[:, None, None].to(out.dtype)
        return out


class MLP(nn.Module):
    """Two-layer GELU MLP ``d -> hidden -> d``."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN transformer block with a dense MLP (encoders)."""

    def __init__(self, dim: int, n_heads: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, N, d)``, ``mask`` ``(B, N)`` -> ``(B, N, d)``."""
        x = x + self.attn(self.norm1(x), key_mask=mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention, MLP."""

    def __init__(self, dim: int, n_heads: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, n_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, n_heads, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden, dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        self_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, L, d)``; ``memory`` ``(B, M, d)``; masks True = valid."""
        x = x + self.self_attn(self.norm1(x), key_mask=self_mask, causal=True)
        x = x + self.cross_attn(self.norm2(x), memory, key_mask=memory_mask)
        return x + self.mlp(self.norm3(x))
