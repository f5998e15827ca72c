"""Token packing: the valid tokens of several padded token sets as one ``(T, d)`` stream,
and self-attention over that stream within each sequence (variable-length flash attention
on a GPU, a masked SDPA on each item's padded layout elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.layers import Attention, sdpa_key_mask


class _ScatterRows(torch.autograd.Function):
    """``out[idx[i]] = x[i]`` into zeros ``(rows, d)`` for *unique* ``idx`` (a permutation
    into a padded buffer); the backward is the gather ``grad[idx]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(idx)
        return x.new_zeros(rows, x.shape[1]).index_copy_(0, idx, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad.index_select(0, idx), None, None


class _GatherRows(torch.autograd.Function):
    """``x[idx]`` for *unique* ``idx``; the backward scatters with ``index_copy`` (no
    atomics) instead of ``index_add``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_copy_(0, idx, grad), None


@dataclass
class TokenPacking:
    """Where the valid tokens of several padded token sets sit in one packed stream.

    The trunk packs the valid tokens of every item (modality) it is given into one
    ``(T, d)`` stream, item after item and row after row, and runs every layer on that:
    each linear layer and the MoE see all ``T`` tokens at once and padding costs nothing.
    Attention stays within each sequence (one item's row): on a GPU in bf16/fp16 one
    variable-length flash-attention call covers every sequence of every item; elsewhere the
    tokens are scattered back into each item's padded layout for a masked SDPA.

    Attributes:
        shapes: ``[(B_i, N_i)]`` of the padded items.
        attn_masks: ``[(B_i, 1, 1, N_i)]`` SDPA key masks of the items (the padded path's;
            built once per pass, every layer uses them).
        sizes: Valid tokens per item (host ints).
        idx: ``(T,)`` rows of the concatenated flat padded layout (``sum B_i*N_i`` rows)
            that hold valid tokens, or None when every token is valid.
        segments: ``(T,)`` int64 item of each packed token.
        cu_seqlens: ``(sum B_i + 1,)`` int32 sequence boundaries in the packed stream
            (a row without valid tokens is an empty sequence).
        max_len: Upper bound of a sequence's length (``max N_i``).
        varlen: Attention may use the variable-length kernel (asked for, and the device
            runs it; it is then used when the attention's dtype allows).
    """

    shapes: list[tuple[int, int]]
    attn_masks: list[torch.Tensor]
    sizes: list[int]
    idx: torch.Tensor | None
    segments: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    varlen: bool = True

    @property
    def num_segments(self) -> int:
        return len(self.shapes)

    @property
    def padded_rows(self) -> int:
        return sum(b * n for b, n in self.shapes)

    @classmethod
    def build(
        cls, masks: list[torch.Tensor], *, device: torch.device, varlen: bool = True
    ) -> TokenPacking:
        """Packing of items with these ``(B_i, N_i)`` masks (one host sync for the sizes)."""
        masks = [m.to(device=device, dtype=torch.bool) for m in masks]
        shapes = [(int(m.shape[0]), int(m.shape[1])) for m in masks]
        lengths = torch.cat([m.sum(1) for m in masks])  # (sum B_i,) valid tokens per row
        sizes = [int(v) for v in torch.stack([m.sum() for m in masks]).tolist()]  # one sync
        idx = None
        if sum(sizes) != sum(m.numel() for m in masks):
            idx = torch.cat([m.reshape(-1) for m in masks]).nonzero().squeeze(1)
        segments = torch.cat(
            [torch.full((b * n,), i, device=device) for i, (b, n) in enumerate(shapes)]
        )  # item of every padded position
        if idx is not None:
            segments = segments.index_select(0, idx)
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
        cu[1:] = lengths.cumsum(0)
        max_len = max((n for _, n in shapes), default=1)
        varlen = varlen and varlen_device(device)
        attn_masks = [sdpa_key_mask(m)[0] for m in masks]
        return cls(shapes, attn_masks, sizes, idx, segments, cu, max_len, varlen)

    def pack(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """``[(B_i, N_i, d)]`` -> ``(T, d)`` valid tokens (the backward is a scatter)."""
        d = xs[0].shape[-1]
        flat = torch.cat([x.reshape(-1, d) for x in xs])
        return flat if self.idx is None else _GatherRows.apply(flat, self.idx)

    def unpack(self, h: torch.Tensor) -> list[torch.Tensor]:
        """``(T, ...)`` -> ``[(B_i, N_i, ...)]`` with zeros at padded positions."""
        tail = h.shape[1:]
        flat = h if self.idx is None else _ScatterRows.apply(h, self.idx, self.padded_rows)
        parts = flat.split([b * n for b, n in self.shapes])
        return [p.view(b, n, *tail) for p, (b, n) in zip(parts, self.shapes, strict=True)]


try:  # variable-length flash attention (PyTorch >= 2.9, CUDA)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older PyTorch
    _varlen_attn = None


def packed_attention(attn: Attention, x: torch.Tensor, pack: TokenPacking) -> torch.Tensor:
    """Self-attention of ``attn``'s weights over packed tokens ``(T, d)``, within each
    sequence of ``pack``; equals ``attn(x_i, key_mask=mask_i)`` at every valid position."""
    t, d = x.shape
    h = attn.n_heads
    dropout = attn.dropout if attn.training else 0.0
    q = attn.q(x).view(t, h, d // h)
    k, v = attn.kv(x).view(t, 2, h, d // h).unbind(1)
    if pack.varlen and dropout == 0.0 and _varlen_supported(q):
        out = _varlen_attn(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_len, pack.max_len)
    else:
        out = _padded_attention(q, k, v, pack, dropout)
    return attn.proj(out.reshape(t, d))


def _varlen_supported(q: torch.Tensor) -> bool:
    """Whether the variable-length flash kernel takes ``q (T, h, dh)`` (the device was
    checked when the packing was built): bf16/fp16 and a head size it is built for."""
    dh = q.shape[-1]
    return q.dtype in (torch.bfloat16, torch.float16) and dh % 8 == 0 and dh <= 256


def varlen_device(device: torch.device) -> bool:
    """Whether PyTorch's ``varlen_attn`` runs on ``device``: CUDA, compute capability 8.0+
    (the flash kernels' minimum)."""
    if _varlen_attn is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: TokenPacking, dropout: float
) -> torch.Tensor:
    """The portable path: packed ``(T, h, dh)`` -> each item's padded layout -> masked
    SDPA -> packed."""
    t, h, dh = q.shape
    outs = []
    per_item = zip(
        *(pack.unpack(z.reshape(t, h * dh)) for z in (q, k, v)), pack.attn_masks, strict=True
    )
    for qi, ki, vi, attn_mask in per_item:
        b, n, _ = qi.shape
        qi, ki, vi = (z.view(b, n, h, dh).transpose(1, 2) for z in (qi, ki, vi))
        # A row without valid keys has no valid queries either: its outputs are dropped
        # when the result is packed again.
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=attn_mask, dropout_p=dropout)
        outs.append(o.transpose(1, 2).reshape(b * n, h * dh))
    flat = torch.cat(outs)
    return (flat if pack.idx is None else _GatherRows.apply(flat, pack.idx)).view(t, h, dh)
