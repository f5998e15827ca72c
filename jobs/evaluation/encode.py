"""Turning a split into embeddings / logits (batched, no grad).

The export is loaded by :func:`jobs.exports.load_export`; this is the only module of the
evaluation package that runs the model, and everything it returns is numpy so that the
metrics stay framework-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs.evaluation.data import EvaluationError, SplitData


def model_modalities(model: torch.nn.Module) -> list[str]:
    """Modalities the model has an encoder for."""
    return list(model.modalities)


def num_classes(model: torch.nn.Module) -> int:
    """Classes of the classification head (0: the export has none)."""
    if getattr(model, "classifier", None) is None:
        return 0
    return int(model.config.num_classes)


def _forward(model: torch.nn.Module, batch: dict[str, Any], modalities: Sequence[str]):
    """``model(batch)`` with shape errors turned into a clear data error."""
    try:
        return model(_to_device(batch, _device(model)), modalities=list(modalities))
    except (RuntimeError, ValueError, IndexError) as e:
        raise EvaluationError(
            f"the model cannot encode the split's {'+'.join(modalities)} tensors "
            f"(was the split prepared with the export's data_config.yaml?): {e}"
        ) from e


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _collate(samples: list[dict], modalities: Sequence[str]) -> dict[str, Any]:
    from models.data import collate

    try:
        return collate(samples, modalities=tuple(modalities))
    except ValueError as e:
        # Shards whose tensors do not fit the model are a data error, not a crash.
        raise EvaluationError(f"cannot batch {'+'.join(modalities)} rows of the split: {e}") from e


@torch.no_grad()
def embed_rows(
    model: torch.nn.Module,
    data: SplitData,
    modality: str,
    rows: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Embeddings of one modality for the given rows.

    Args:
        rows: (n,) row indices, each having ``modality``.

    Returns:
        (n, E) float32 L2-normalized embeddings in the shared space.
    """
    col = data.tensors[modality]
    chunks = []
    for s in range(0, len(rows), batch_size):
        samples = [{modality: col[i]} for i in rows[s : s + batch_size]]
        out = _forward(model, _collate(samples, [modality]), [modality])
        chunks.append(out.embeds[modality].float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


@torch.no_grad()
def embed_arrays(
    model: torch.nn.Module, modality: str, arrays: list[np.ndarray], batch_size: int
) -> np.ndarray:
    """(n, E) embeddings of featurized arrays of one modality (e.g. tokenized prompts)."""
    data = SplitData(ids=[str(i) for i in range(len(arrays))], labels=[None] * len(arrays))
    data.tensors[modality] = list(arrays)
    return embed_rows(model, data, modality, np.arange(len(arrays)), batch_size)


@torch.no_grad()
def head_logits(
    model: torch.nn.Module,
    data: SplitData,
    modalities: Sequence[str],
    rows: np.ndarray,
    batch_size: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Embeddings plus classification-head logits, fused and per modality, in one pass.

    One forward over ``modalities`` gives all of it: ``out.embeds[m]``, ``out.logits``
    (the head on the fused embedding) and ``out.modality_logits[m]`` (the same head on
    modality ``m``'s embedding; the model trains the head on both, so they compare).

    Args:
        rows: (n,) row indices, each having every one of ``modalities``.

    Returns:
        ``({m: (n, E)}, fused (n, C), {m: (n, C)})`` float32 arrays.
    """
    embeds: dict[str, list] = {m: [] for m in modalities}
    fused: list[np.ndarray] = []
    single: dict[str, list] = {m: [] for m in modalities}
    for s in range(0, len(rows), batch_size):
        samples = [{m: data.tensors[m][i] for m in modalities} for i in rows[s : s + batch_size]]
        out = _forward(model, _collate(samples, modalities), modalities)
        if out.logits is None:
            raise EvaluationError("the model returned no fused logits (fusion part missing)")
        fused.append(out.logits.float().cpu().numpy())
        for m in modalities:
            embeds[m].append(out.embeds[m].float().cpu().numpy())
            single[m].append(out.modality_logits[m].float().cpu().numpy())
    return (
        {m: np.concatenate(v) for m, v in embeds.items()},
        np.concatenate(fused),
        {m: np.concatenate(v) for m, v in single.items()},
    )


@dataclass
class SamplePass:
    """One forward per row with every modality it has (of those asked for).

    Attributes:
        embeds: ``{m: (rows (n_m,), embeddings (n_m, E))}``, rows ascending.
        modality_logits: ``{m: (n_m, C)}`` head logits of modality ``m`` alone, aligned with
            ``embeds[m]`` rows (empty without a classification head).
        fused_rows: ``(n,)`` rows with any of the modalities, ascending.
        fused_logits: ``(n, C)`` head logits of each row's fused modalities, or None.
        row_modalities: ``(n,)`` the modality tuple each fused row was encoded with.
    """

    embeds: dict[str, tuple[np.ndarray, np.ndarray]]
    modality_logits: dict[str, np.ndarray]
    fused_rows: np.ndarray
    fused_logits: np.ndarray | None
    row_modalities: list[tuple[str, ...]]


@torch.no_grad()
def encode_samples(
    model: torch.nn.Module, data: SplitData, modalities: Sequence[str], batch_size: int
) -> SamplePass:
    """Embeddings and head logits of every row, each row encoded once with all its modalities.

    Rows are grouped by the set of modalities they hold, so a batch runs only the branches
    its rows need; per-modality embeddings and logits do not depend on the other
    modalities of the row, the fused logits are those of the row as a whole (what a
    per-sample prediction of the model is).
    """
    has = {
        m: np.asarray([t is not None for t in data.tensors.get(m, [])], bool) for m in modalities
    }
    combos: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(data)):
        key = tuple(m for m in modalities if len(has[m]) and has[m][i])
        if key:
            combos.setdefault(key, []).append(i)
    emb: dict[str, list] = {m: [] for m in modalities}
    mlog: dict[str, list] = {m: [] for m in modalities}
    rows_of: dict[str, list] = {m: [] for m in modalities}
    f_rows: list[np.ndarray] = []
    f_logits: list[np.ndarray] = []
    for combo, idx in combos.items():
        idx_arr = np.asarray(idx, dtype=np.int64)
        for s in range(0, len(idx_arr), batch_size):
            rows = idx_arr[s : s + batch_size]
            samples = [{m: data.tensors[m][i] for m in combo} for i in rows]
            out = _forward(model, _collate(samples, combo), combo)
            f_rows.append(rows)
            if out.logits is not None:
                f_logits.append(out.logits.float().cpu().numpy())
            for m in combo:
                rows_of[m].append(rows)
                emb[m].append(out.embeds[m].float().cpu().numpy())
                if m in out.modality_logits:
                    mlog[m].append(out.modality_logits[m].float().cpu().numpy())
    embeds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    logits: dict[str, np.ndarray] = {}
    for m in modalities:
        if not rows_of[m]:
            continue
        r = np.concatenate(rows_of[m])
        order = np.argsort(r, kind="stable")
        embeds[m] = (r[order], np.concatenate(emb[m])[order])
        if mlog[m]:
            logits[m] = np.concatenate(mlog[m])[order]
    fr = np.concatenate(f_rows) if f_rows else np.zeros(0, np.int64)
    order = np.argsort(fr, kind="stable")
    fused = np.concatenate(f_logits)[order] if f_logits and len(f_logits) == len(f_rows) else None
    combo_of = {i: c for c, idx in combos.items() for i in idx}
    return SamplePass(embeds, logits, fr[order], fused, [combo_of[int(i)] for i in fr[order]])
