"""The trunk's feed-forward variants: top-k routed sparse MoE, DeepSpeed MoE, dense.

Each trunk block (:mod:`models.trunk`) is pre-LN self-attention followed by one of these
FFNs, chosen by :func:`build_ffn`. The native
implementation groups token->expert assignments by expert with one stable sort, gathers
the tokens with one ``index_select``, runs each expert once on its contiguous slice and
scatters the weighted results back with one ``index_add_``: no Python loop over tokens,
only over experts. Experts are ``nn.Linear`` MLPs, so dynamic INT8 quantization covers
them. ``moe_impl="deepspeed"`` swaps in ``deepspeed.moe.layer.MoE`` (expert parallelism
over ``ep_size`` ranks) behind the same interface; ``moe_impl="dense"`` is a plain MLP
with the same *active* parameters (``top_k * expert_hidden`` hidden units) for comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from models.config import OmniConfig
from models.layers import MLP
from models.packing import _GatherRows, _ScatterRows


@dataclass
class MoEStats:
    """Routing statistics of one MoE layer call.

    Attributes:
        aux: Load-balancing loss ``E * sum_e f_e * P_e`` (1.0 when perfectly balanced).
        z: Router z-loss ``mean(logsumexp(logits)^2)``.
        counts: ``(E,)`` int64 token->expert assignments (before capacity drops).
        dropped: Scalar int64, assignments dropped by the capacity limit.
    """

    aux: torch.Tensor
    z: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor


class TopKRouter(nn.Module):
    """Linear router with softmax probabilities and renormalized top-k weights.

    The weight is a plain parameter used through ``F.linear`` (not an ``nn.Linear``) so
    that dynamic INT8 quantization leaves routing decisions in fp32.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * 0.02)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routes tokens.

        Args:
            x: ``(T, d)``.

        Returns:
            ``weights (T, k)`` (sum to 1 per token), ``experts (T, k)`` int64,
            ``probs (T, E)`` and ``logits (T, E)``, both fp32.
        """
        # fp32 for stable softmax and routing that does not depend on the GEMM precision
        # (autocast would run this linear in bf16: near-ties would pick other experts).
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (T, E)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        return weights, experts, probs, logits


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(E,)`` int64 assignments per expert (``bincount`` with a static output size, so
    it also traces under ``torch.compile``)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch/GShard balance loss generalized to top-k: ``E * sum_e f_e * P_e``.

    Args:
        probs: ``(T, E)`` router probabilities.
        experts: ``(T, k)`` chosen experts.
        num_experts: ``E``.

    Returns:
        Scalar; 1.0 for uniform routing, up to ``E`` when everything goes to one expert.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    counts = expert_counts(experts, num_experts).to(probs.dtype)
    frac = counts / counts.sum()  # f_e, no gradient (argmax)
    return num_experts * (frac * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean(logsumexp(logits)^2)``; keeps router logits small."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, -1).pow(2).mean()


class NativeMoE(nn.Module):
    """Top-k routed MoE FFN with optional capacity-based token dropping."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        num_experts: int,
        top_k: int,
        capacity_factor: float = 1.25,
        dropless: bool = True,
        dropout: float = 0.0,
        grouped_gemm: str = "auto",
    ) -> None:
        super().__init__()
        if grouped_gemm not in ("auto", "always", "never"):
            raise ValueError(f"grouped_gemm must be auto|always|never, got {grouped_gemm!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dropless = dropless
        self.router = TopKRouter(dim, num_experts, top_k)
        self.experts = nn.ModuleList(MLP(dim, hidden, dropout=dropout) for _ in range(num_experts))
        # "auto": grouped GEMMs for bf16 on CUDA (dropless); "never"/"always" force a path.
        self.grouped_gemm = grouped_gemm
        self.align: int | None = None  # grouped rows per expert padded to this (None: 16 on CUDA)
        self.dropout = dropout

    def capacity(self, num_tokens: int) -> int:
        """Per-expert slot count when dropping: ``ceil(cf * T * k / E)``."""
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(
        self, x: torch.Tensor, segments: torch.Tensor | None = None, num_segments: int = 1
    ) -> tuple[torch.Tensor, MoEStats]:
        """Routes tokens through the experts.

        Args:
            x: ``(T, d)`` tokens.
            segments: Optional ``(T,)`` int64 segment (modality) of each token; then
                ``counts`` is ``(S, E)`` and ``dropped`` ``(S,)`` per segment.
            num_segments: ``S``.

        Returns:
            ``(T, d)`` and :class:`MoEStats`.
        """
        t, _ = x.shape
        k, e = self.top_k, self.num_experts
        weights, experts, probs, logits = self.router(x)
        aux = load_balancing_loss(probs, experts, e)
        z = router_z_loss(logits)
        # k-major flattening: all first choices precede all second choices, so with a
        # stable sort by expert the capacity limit drops lower-priority choices first.
        flat_e = experts.t().reshape(-1)  # (k*T,)
        flat_tok = torch.arange(t, device=x.device).repeat(k)  # (k*T,)
        flat_w = weights.t().reshape(-1)
        counts = expert_counts(flat_e, e)  # (E,)
        seg_counts = counts
        no_drop = torch.zeros((), dtype=torch.long, device=x.device)
        if segments is not None:
            flat_seg = segments.repeat(k)  # (k*T,) segment of each assignment
            seg_counts = expert_counts(flat_seg * e + flat_e, num_segments * e).view(-1, e)
            no_drop = torch.zeros(num_segments, dtype=torch.long, device=x.device)
        if self._use_grouped(x):
            out = self._grouped_experts(x, experts, weights, counts)
            return out, MoEStats(aux=aux, z=z, counts=seg_counts, dropped=no_drop)
        order = torch.sort(flat_e, stable=True).indices
        sorted_e, tok, w = flat_e[order], flat_tok[order], flat_w[order]
        kept = counts
        dropped = no_drop
        if not self.dropless:
            cap = self.capacity(t)
            starts = torch.cumsum(counts, 0) - counts  # (E,) first slot of each expert
            rank = torch.arange(sorted_e.numel(), device=x.device) - starts[sorted_e]
            keep = rank < cap
            if segments is None:
                dropped = (~keep).sum()
            else:
                dropped = expert_counts(flat_seg[order][~keep], num_segments)
            tok, w = tok[keep], w[keep]
            kept = counts.clamp(max=cap)
        xs = x.index_select(0, tok)  # (A, d) tokens grouped by expert
        outs = []
        track_grads = torch.is_grad_enabled()
        for i, chunk in enumerate(xs.split(kept.tolist())):
            # While training, every expert runs even on an empty chunk: an expert left out of
            # one rank's backward gets no gradient there, and data-parallel reducers (DDP,
            # ZeRO's gradient buckets) then disagree across ranks and abort.
            if chunk.shape[0] or track_grads:
                outs.append(self.experts[i](chunk))
        out = torch.zeros_like(x)
        if outs:
            y = torch.cat(outs) * w.to(x.dtype).unsqueeze(-1)  # (A, d)
            out = out.index_add(0, tok, y)
        return out, MoEStats(aux=aux, z=z, counts=seg_counts, dropped=dropped)

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.grouped_gemm == "never" or not self.dropless or not hasattr(torch, "_grouped_mm"):
            return False
        if self.grouped_gemm == "always":
            return True
        # "auto": the fused GPU path, for a bf16 model or under bf16 autocast (where x, the
        # output of a LayerNorm, is fp32 but every expert GEMM would run in bf16).
        return x.is_cuda and _compute_dtype(x) == torch.bfloat16

    def _grouped_experts(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """All experts in two grouped GEMMs (``torch._grouped_mm``), without a host sync
        and without atomic scatter-adds.

        Expert weights are stacked on the fly (cheap next to the GEMMs on a GPU) so the
        parameters stay per-expert ``nn.Linear`` modules (INT8, checkpoints). Each
        expert's row group is padded to a multiple of ``align`` rows (the Hopper kernels
        need it for the weight-gradient GEMM). Tokens move with unique-index row
        permutations whose backward is again a gather, and the k expert outputs of a token
        are combined with a dense weighted sum (dropless: every token has exactly k).

        Args:
            x: ``(T, d)`` tokens.
            experts: ``(T, k)`` chosen experts; weights: ``(T, k)`` their weights.
            counts: ``(E,)`` assignments per expert.

        Returns:
            ``(T, d)`` combined expert outputs.
        """
        t, d = x.shape
        k, e = self.top_k, self.num_experts
        a = t * k
        align = self.align or (16 if x.is_cuda else 1)
        # The GEMM dtype: the model's, or autocast's (which does not cover _grouped_mm). The
        # result comes back in x's dtype, as the loop path's does: under autocast the
        # residual stream it joins is fp32.
        in_dtype, dt = x.dtype, _compute_dtype(x)
        x = x.to(dt)
        flat_e = experts.t().reshape(-1)  # (A,) k-major assignment -> expert
        order = torch.sort(flat_e, stable=True).indices  # assignments grouped by expert
        rank = torch.empty_like(order)
        rank[order] = torch.arange(a, device=x.device)  # position of each assignment in order
        start = torch.cumsum(counts, 0) - counts
        rows = a + e * (align - 1)  # static upper bound of the padded row count
        padded = (counts + align - 1) // align * align
        padded[-1] += rows - padded.sum()  # the last group absorbs the slack: offs[-1] == rows
        offs = torch.cumsum(padded, 0)
        # Buffer row of every (k-major) assignment: its expert's padded start + its rank.
        dest = (offs - padded)[flat_e] + rank - start[flat_e]  # (A,) unique
        x_rep = x.unsqueeze(0).expand(k, t, d).reshape(a, d)  # backward: a sum over k
        buf = _ScatterRows.apply(x_rep, dest, rows)  # (rows, d)
        row_expert = torch.searchsorted(
            offs, torch.arange(rows, device=x.device), right=True
        ).clamp(max=e - 1)
        w1 = torch.stack([m.fc1.weight for m in self.experts]).to(dt)  # (E, h, d)
        b1 = torch.stack([m.fc1.bias for m in self.experts])  # (E, h)
        w2 = torch.stack([m.fc2.weight for m in self.experts]).to(dt)  # (E, d, h)
        b2 = torch.stack([m.fc2.bias for m in self.experts])  # (E, d)
        offs32 = offs.to(torch.int32)
        h = torch._grouped_mm(buf, w1.transpose(-2, -1), offs=offs32)  # (rows, h)
        # Row biases as a gather (fused with the GELU under torch.compile: no (rows, h)
        # bias tensor is written) whose backward is a one-hot GEMM, not an atomic scatter.
        h = F.gelu(h + _RowBias.apply(b1.to(x.dtype), row_expert))
        y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs32)
        y = y + _RowBias.apply(b2.to(x.dtype), row_expert)
        y = F.dropout(y, self.dropout, self.training)
        y = _GatherRows.apply(y, dest)  # (A, d) back in k-major assignment order
        wk = weights.t().to(y.dtype).unsqueeze(-1)  # (k, T, 1)
        return (y.view(k, t, d) * wk).sum(0).to(in_dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on for x's device."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype.is_floating_point:
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _RowBias(torch.autograd.Function):
    """``bias[row_expert]`` ``(rows, n)`` from ``bias (E, n)``; the backward sums each
    expert's rows with a one-hot GEMM (``onehot.T @ grad``) instead of an ``index_add``
    whose atomics would all land on E rows."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_expert)
        ctx.num_experts = bias.shape[0]
        return bias.index_select(0, row_expert)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (row_expert,) = ctx.saved_tensors
        experts = torch.arange(ctx.num_experts, device=grad.device)
        onehot = (experts[:, None] == row_expert[None, :]).to(grad.dtype)  # (E, rows)
        return onehot @ grad, None


class DenseFFN(nn.Module):
    """Dense MLP with the active parameters of a top-k MoE (for comparisons)."""

    def __init__(
        self, dim: int, hidden: int, *, num_experts: int, top_k: int, dropout: float = 0.0
    ):
        super().__init__()
        self.num_experts = num_experts
        self.mlp = MLP(dim, hidden * top_k, dropout=dropout)

    def forward(
        self, x: torch.Tensor, segments: torch.Tensor | None = None, num_segments: int = 1
    ) -> tuple[torch.Tensor, MoEStats]:
        zero = x.sum() * 0.0
        shape = (self.num_experts,) if segments is None else (num_segments, self.num_experts)
        counts = torch.zeros(shape, dtype=torch.long, device=x.device)
        return self.mlp(x), MoEStats(aux=zero, z=zero, counts=counts, dropped=counts.sum(-1))


class DeepSpeedMoEFFN(nn.Module):
    """``deepspeed.moe.layer.MoE`` behind the :class:`NativeMoE` interface.

    Experts are sharded over ``ep_size`` ranks (expert parallelism); DeepSpeed must have
    set up its expert-parallel groups (``deepspeed.initialize`` does, or call
    ``layer.moe.set_deepspeed_parallelism()`` after ``torch.distributed`` is initialized).
    DeepSpeed computes its own balance loss and does not expose router logits, so the
    z-loss is reported as 0.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        num_experts: int,
        top_k: int,
        ep_size: int = 1,
        capacity_factor: float = 1.25,
        dropless: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE  # lazy: models/ must import without deepspeed

        self.num_experts = num_experts
        self.moe = MoE(
            hidden_size=dim,
            expert=MLP(dim, hidden, dropout=dropout),
            num_experts=num_experts,
            ep_size=ep_size,
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=4,
            drop_tokens=not dropless,
            use_rts=False,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        out, l_aux, exp_counts = self.moe(x.unsqueeze(0))  # DeepSpeed wants (B, S, d)
        counts = torch.as_tensor(exp_counts, device=x.device).reshape(-1).long()
        if counts.numel() != self.num_experts:  # local experts only under expert parallelism
            counts = F.pad(counts, (0, self.num_experts - counts.numel()))
        zero = x.sum() * 0.0
        return out.squeeze(0), MoEStats(
            aux=l_aux, z=zero, counts=counts, dropped=torch.zeros((), dtype=torch.long)
        )


def build_ffn(cfg: OmniConfig) -> nn.Module:
    """The trunk FFN selected by ``cfg.moe_impl``."""
    kw = dict(num_experts=cfg.num_experts, top_k=cfg.top_k, dropout=cfg.dropout)
    if cfg.moe_impl == "dense":
        return DenseFFN(cfg.d_model, cfg.ffn_hidden, **kw)
    if cfg.moe_impl == "deepspeed":
        return DeepSpeedMoEFFN(
            cfg.d_model,
            cfg.ffn_hidden,
            ep_size=cfg.ep_size,
            capacity_factor=cfg.capacity_factor,
            dropless=cfg.dropless,
            **kw,
        )
    return NativeMoE(
        cfg.d_model,
        cfg.ffn_hidden,
        capacity_factor=cfg.capacity_factor,
        dropless=cfg.dropless,
        **kw,
    )


def __getattr__(name: str):
    # Backwards-compatible names: the trunk and the packing moved to their own modules.
    import models.packing
    import models.trunk

    for mod in (models.trunk, models.packing):
        if name in vars(mod):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
