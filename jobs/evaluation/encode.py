"""Loading an export and turning a split into embeddings / logits (batched, no grad).

The only module of the evaluation package that touches ``models/``; everything it
returns is numpy so that the metrics stay framework-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from jobs.evaluation.data import EvaluationError, SplitData

EXPORT_FILES = ("model.safetensors", "model_config.yaml")


def check_export(export_dir: str | Path) -> Path:
    """Validates the export layout (Contract 3) before anything heavy is loaded.

    Raises:
        EvaluationError: missing directory or files, or an unreadable model_config.yaml.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise EvaluationError(f"export directory not found: {export_dir}")
    missing = [f for f in EXPORT_FILES if not (export_dir / f).is_file()]
    if missing:
        raise EvaluationError(
            f"{export_dir} is not an export: missing {missing} (expected {list(EXPORT_FILES)}, "
            "written by `python -m jobs.export`)"
        )
    try:
        cfg = yaml.safe_load((export_dir / "model_config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EvaluationError(f"corrupt {export_dir / 'model_config.yaml'}: {e}") from e
    if not isinstance(cfg, dict):
        raise EvaluationError(
            f"corrupt {export_dir / 'model_config.yaml'}: top level must be a mapping, "
            f"got {type(cfg).__name__}"
        )
    return export_dir


def load_model(export_dir: Path, device: str = "cpu") -> torch.nn.Module:
    """``OmniModel.from_pretrained`` in eval mode on ``device``.

    Raises:
        EvaluationError: the export cannot be rebuilt (bad config, weights mismatch).
    """
    from models import OmniModel

    try:
        model = OmniModel.from_pretrained(export_dir, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here is a bad export, not a bug of ours
        raise EvaluationError(
            f"cannot load the model from {export_dir}: {type(e).__name__}: {e}"
        ) from e
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise EvaluationError(f"device {device!r} requested but CUDA is not available")
    except RuntimeError as e:
        raise EvaluationError(f"bad device {device!r}: {e}") from e
    return model.to(dev).eval()


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
