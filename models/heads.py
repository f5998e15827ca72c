"""Heads: modality adapters, contrastive projections, masked reconstruction, text decoder,
classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import OmniConfig
from models.layers import Attention, DecoderBlock


class Adapter(nn.Module):
    """Per-modality residual bottleneck after the shared trunk."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        r = max(8, int(cfg.d_model * cfg.adapter_ratio))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.down = nn.Linear(cfg.d_model, r)
        self.up = nn.Linear(r, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` -> ``(B, N, d)``."""
        return x + self.up(F.gelu(self.down(self.norm(x))))


class ProjectionHead(nn.Module):
    """Pooled ``(B, d)`` -> L2-normalized ``(B, E)`` in the shared space."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(pooled)), dim=-1)


class ReconHead(nn.Module):
    """Predicts the targets of masked tokens of one modality.

    Unimodal: from the modality's own (masked) token features. Cross-modal: the tokens
    first cross-attend to the tokens of the other modalities present.
    """

    def __init__(self, cfg: OmniConfig, out_dim: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.cross_attn = Attention(d, cfg.n_heads, dropout=cfg.dropout)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, out_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens (B, N, d)``, ``context (B, M, d)`` -> predictions ``(B, N, out_dim)``."""
        x = tokens
        if context is not None:
            x = x + self.cross_attn(self.norm_q(x), self.norm_kv(context), key_mask=context_mask)
        return self.out(F.gelu(self.fc(self.norm(x))))


class TextDecoder(nn.Module):
    """Small transformer decoder: any-modality token features -> text."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.bos_id, self.eos_id, self.pad_id = cfg.bos_id, cfg.eos_id, cfg.pad_id
        self.max_len = cfg.max_text_len
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_text_len, d) * 0.02)
        hidden = int(cfg.mlp_ratio * d)
        self.blocks = nn.ModuleList(
            DecoderBlock(d, cfg.n_heads, hidden, dropout=cfg.dropout)
            for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size)

    def forward(
        self,
        ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        ids_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            ids: ``(B, L)`` input ids (starting with ``<bos>``), ``L <= max_text_len``.
            memory: ``(B, M, d)`` modality token features.
            memory_mask: ``(B, M)`` bool.
            ids_mask: ``(B, L)`` bool, True = real token.

        Returns:
            ``(B, L, V)`` next-token logits.
        """
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"decoder input length {n} exceeds max_text_len={self.max_len}")
        x = self.embed(ids) + self.pos[:, :n]
        for blk in self.blocks:
            x = blk(x, memory, memory_mask, ids_mask)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        *,
        max_len: int = 16,
        num_beams: int = 1,
    ) -> list[list[int]]:
        """Greedy (``num_beams=1``) or beam-search decoding.

        Args:
            memory: ``(B, M, d)``; memory_mask: ``(B, M)``.
            max_len: Most generated tokens (``<bos>``/``<eos>`` excluded), capped by
                ``max_text_len - 1``.
            num_beams: Beam width.

        Returns:
            One list of token ids per row, without ``<bos>``/``<eos>``.
        """
        if num_beams < 1 or max_len < 1:
            raise ValueError("num_beams and max_len must be >= 1")
        max_len = min(max_len, self.max_len - 1)
        b, k = memory.shape[0], num_beams
        mem = memory.repeat_interleave(k, 0)  # (B*K, M, d)
        mmask = memory_mask.repeat_interleave(k, 0)
        ids = torch.full((b * k, 1), self.bos_id, dtype=torch.long, device=memory.device)
        scores = torch.zeros(b, k, device=memory.device)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one
        finished = torch.zeros(b * k, dtype=torch.bool, device=memory.device)
        lengths = torch.zeros(b * k, device=memory.device)
        for _ in range(max_len):
            logp = self.forward(ids, mem, mmask)[:, -1].float().log_softmax(-1)  # (B*K, V)
            # Finished beams may only extend with <pad> at no cost.
            logp[finished] = float("-inf")
            logp[finished, self.pad_id] = 0.0
            v = logp.shape[-1]
            cand = (scores.reshape(-1, 1) + logp).view(b, k * v)  # (B, K*V)
            top, idx = cand.topk(k, dim=-1)  # (B, K)
            beam = idx // v + torch.arange(b, device=memory.device)[:, None] * k
            tok = (idx % v).reshape(-1)
            beam = beam.reshape(-1)
            ids = torch.cat([ids[beam], tok[:, None]], 1)
            was_done = finished[beam]
            lengths = lengths[beam] + (~was_done).to(lengths.dtype)
            finished = was_done | (tok == self.eos_id)
            scores = top
            if bool(finished.all()):
                break
        # Length-normalized beam choice (greedy: only one live beam anyway).
        norm = scores.reshape(-1) / lengths.clamp_min(1.0)
        best = norm.view(b, k).argmax(-1) + torch.arange(b, device=memory.device) * k
        out = []
        for row in ids[best, 1:].tolist():
            seq = []
            for t in row:
                if t in (self.eos_id, self.pad_id):
                    break
                seq.append(t)
            out.append(seq)
        return out


class ClassifierHead(nn.Module):
    """Logits over ``num_classes`` from a (fused or single-modality) embedding ``(B, E)``."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        # LayerNorm first: embeddings are unit-norm, so their raw scale is tiny.
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))
