"""Cross-modal fusion: cross-attention between the present modalities, then gated fusion.

For every modality ``i`` present, its pooled vector attends over the tokens of the other
present modalities (``h_i = p_i + CrossAttn(p_i, tokens_{j != i})``). The gate then is

    g = sigmoid(W_g [h_1; ...; h_M] + b_g),   g_i in (0, 1)^d,   h = sum_i g_i * h_i

over the fixed slot order ``cfg.modalities``. A missing modality (absent from the batch,
or absent in one row) is *masked out*: its slot in the gate input holds a learned
"missing" embedding rather than zeros, and its gate is forced to 0 so it contributes
nothing. The reported gate weight of a modality is the mean of ``g_i`` over ``d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import OmniConfig
from models.layers import Attention


class GatedFusion(nn.Module):
    """Cross-attention + gated fusion into the shared embedding space."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.modalities = list(cfg.modalities)
        m = len(self.modalities)
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.cross_attn = Attention(d, cfg.fusion_heads, dropout=cfg.dropout)
        self.missing = nn.Parameter(torch.randn(m, d) * 0.02)  # (M, d) stand-ins in gate input
        self.gate = nn.Linear(m * d, m * d)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.embed_dim, bias=False)

    def forward(
        self,
        pooled: dict[str, torch.Tensor],
        tokens: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuses the given modalities.

        Args:
            pooled: ``{m: (B, d)}`` pooled features.
            tokens: ``{m: (B, N_m, d)}`` token features (keys for cross-attention).
            masks: ``{m: (B, N_m)}`` bool, True = valid token.
            present: ``{m: (B,)}`` bool, True = row has modality ``m``.

        Returns:
            ``fused (B, E)`` L2-normalized and ``gates (B, M)`` in ``self.modalities`` order
            (0 for missing modalities).
        """
        unknown = [m for m in pooled if m not in self.modalities]
        if unknown:
            raise KeyError(f"fusion has no slot for {unknown}; slots: {self.modalities}")
        if not pooled:
            raise ValueError("fuse_features needs at least one modality")
        ref = next(iter(pooled.values()))
        b, d = ref.shape
        hs: dict[str, torch.Tensor] = {}
        for m in pooled:
            others = [o for o in pooled if o != m]
            h = pooled[m]
            if others:
                ctx = torch.cat([tokens[o] for o in others], 1)  # (B, sum N, d)
                ctx_mask = torch.cat([masks[o] & present[o][:, None] for o in others], 1)
                h = h + self.cross_attn(
                    self.norm_q(h).unsqueeze(1), self.norm_kv(ctx), key_mask=ctx_mask
                ).squeeze(1)
            hs[m] = h
        slots, pres = [], []
        for i, m in enumerate(self.modalities):
            miss = self.missing[i].expand(b, d)
            if m in hs:
                p = present[m]
                slots.append(torch.where(p[:, None], hs[m], miss))
                pres.append(p)
            else:
                slots.append(miss)
                pres.append(torch.zeros(b, dtype=torch.bool, device=ref.device))
        h_all = torch.stack(slots, 1)  # (B, M, d)
        pmask = torch.stack(pres, 1)  # (B, M)
        g = torch.sigmoid(self.gate(h_all.reshape(b, -1))).view(b, -1, d)  # (B, M, d)
        g = g * pmask.unsqueeze(-1).to(g.dtype)  # missing modalities masked out of the gate
        h = (g * h_all).sum(1)  # (B, d)
        fused = F.normalize(self.proj(self.norm(h)), dim=-1)
        return fused, g.mean(-1)
