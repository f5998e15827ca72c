"""Symmetric InfoNCE between two modalities, with cross-worker negatives.

The loss is OpenCLIP's "local loss": this worker's rows are the queries, the keys are the
rows of *every* worker (gathered with gradients), so each worker's encoder gets the gradient
of its own queries and of its rows used as keys elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GatherFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a local ``(B, ...)`` tensor to the ``(W*B, ...)`` concatenation over the ``W``
workers, in rank order, keeping gradients (``jobs.training.engine.gather_with_grad``).
Every worker must call it the same number of times with the same ``B``."""

IGNORE_INDEX = -100
"""Label of a row whose class is unknown (never a positive of another row)."""


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    present_a: torch.Tensor,
    present_b: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    max_scale: float = 100.0,
    labels: torch.Tensor | None = None,
    gather: GatherFn | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE between modalities ``a`` and ``b``: local queries vs gathered keys.

    ``loss = (CE(a -> keys_b) + CE(b -> keys_a)) / 2`` where ``CE(q -> keys)`` is the mean,
    over this worker's rows having both modalities, of ``-sum_k t_k log softmax_k(s q.k)``
    with ``s = min(exp(logit_scale), max_scale)``. Keys are the gathered rows that have the
    key modality. The target ``t`` puts equal mass on the row's own pair and, when ``labels``
    are given, on every key of the same known class (multi-positive targets, for corpora
    whose pairs are category-level).

    Args:
        a, b: ``(B, E)`` L2-normalized embeddings of this worker's rows.
        present_a, present_b: ``(B,)`` bool rows that have each modality.
        logit_scale: Scalar learnable log inverse temperature.
        max_scale: Clamp of ``exp(logit_scale)``.
        labels: ``(B,)`` int class ids (``IGNORE_INDEX`` unknown) for multi-positive
            targets; None: only the row's own pair is a positive.
        gather: Cross-worker gather with gradients (see :data:`GatherFn`); None = one worker.
            Called three times on every worker whatever its rows hold (embeddings ``a``,
            ``b`` and a float ``(B, 3)`` presence/label table) so no worker waits alone.
        rank: This worker's index in the gathered order (its rows are keys
            ``rank*B .. rank*B+B-1``).

    Returns:
        Scalar loss; a zero still attached to ``a``, ``b`` and ``logit_scale`` when no row
        of this worker has both modalities (every worker's graph covers the same parameters).
    """
    g = gather or (lambda x: x)
    bsz = a.shape[0]
    if labels is not None:
        lab = labels.long()
    else:
        lab = torch.full((bsz,), IGNORE_INDEX, dtype=torch.long, device=a.device)
    # One float table for presence and labels (exact for ids < 2**24): one collective.
    meta = torch.stack([present_a.float(), present_b.float(), lab.float()], 1)  # (B, 3)
    ga, gb, gmeta = g(a), g(b), g(meta)  # (W*B, E), (W*B, E), (W*B, 3)
    gpa, gpb, glab = gmeta[:, 0] > 0.5, gmeta[:, 1] > 0.5, gmeta[:, 2].round().long()
    scale = logit_scale.exp().clamp(max=max_scale)
    both = present_a.bool() & present_b.bool()
    zero = (ga.sum() + gb.sum() + scale.sum()) * 0.0
    if not bool(both.any()):
        return zero
    rows = torch.arange(bsz, device=a.device)
    if labels is not None:
        tgt = (lab[:, None] == glab[None, :]) & (lab[:, None] != IGNORE_INDEX)
    else:
        tgt = torch.zeros(bsz, ga.shape[0], dtype=torch.bool, device=a.device)
    tgt[rows, rows + rank * bsz] = True  # each row's own pair among the gathered keys
    loss = zero
    for q, keys, key_present in ((a, gb, gpb), (b, ga, gpa)):
        logits = scale * q @ keys.t()  # (B, W*B)
        logits = logits.masked_fill(~key_present[None, :], float("-inf"))
        t = (tgt & key_present[None, :]).float()
        t = t / t.sum(1, keepdim=True).clamp_min(1.0)
        logp = logits.float().log_softmax(1).masked_fill(~key_present[None, :], 0.0)
        loss = loss + (-(t * logp).sum(1))[both].mean()
    return loss / 2
