"""Loading what a replica needs from an export directory (Contract 3), and INT8.

Every replica loads the export with the one loader, :func:`jobs.exports.load_export`, and
only its part: a modality replica asks for ``modalities=[m], parts=[]`` (its branch, the
trunk and the temperature), the fusion replica for no branch and the fusion/decoder/heads.
The loader fails loudly on a missing file or on model sizes that disagree with the
featurizers; nothing falls back to default featurization. Nothing here unpickles: weights
are safetensors, configs YAML, the tokenizer JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("omniray.serve")


def export_modalities(export_dir: str | Path) -> list[str]:
    """The modalities the exported model has a branch for (its ``model_config.yaml``)."""
    from models.pretrained import read_config

    return list(read_config(export_dir).modalities)


def check_serving(
    export_dir: str | Path,
    modalities: list[str] | None,
    features: Mapping[str, Any] | None = None,
) -> list[str]:
    """Driver-side check of what the replicas will load (no weights are read).

    Args:
        export_dir: Export directory.
        modalities: Modalities to serve (None = every branch of the export).
        features: Overrides of the export's featurizer config.

    Returns:
        The modalities to serve.

    Raises:
        jobs.exports.ExportError: A missing file, a modality without a branch, overrides
            that do not apply or change the featurizers' output sizes.
    """
    from jobs.exports import MODEL_CONFIG_FILE, ExportError, check_export, load_featurizers
    from models.pretrained import read_config

    d = check_export(export_dir)
    config = read_config(d)
    branches = list(config.modalities)
    served = branches if modalities is None else list(modalities)
    missing = [m for m in served if m not in branches]
    if missing:
        raise ExportError(f"{d / MODEL_CONFIG_FILE}: no branch for served modalities {missing}")
    load_featurizers(d, config, served, dict(features or {}))
    return served


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic INT8 quantization of every ``nn.Linear`` (weights int8, activations fp32).

    Uses the model library's own helper when it has one (it knows about MoE expert
    weights), else ``torch.ao.quantization.quantize_dynamic``.
    """
    fn = getattr(model, "quantize_dynamic", None)
    if callable(fn):
        out = fn()
        return out if isinstance(out, torch.nn.Module) else model
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_for_serving(
    export_dir: str | Path,
    *,
    modalities: Iterable[str],
    parts: Iterable[str] | None = None,
    quantization: str = "none",
    features: Mapping[str, Any] | None = None,
) -> Any:
    """Loads (part of) an export for a replica: model in eval mode, featurizers, templates.

    Args:
        export_dir: Export directory.
        modalities: Encoder branches (and featurizers) to load.
        parts: Non-encoder parts to load (None = all; ``[]`` = branches + trunk only).
        quantization: ``"none"`` or ``"int8"``.
        features: Overrides of the export's featurizer config (``OmniServeArgs.features``).

    Returns:
        The :class:`jobs.exports.Export`, its model ``requires_grad`` off (INT8 if asked).

    Raises:
        jobs.exports.ExportError: A missing/unreadable file, sizes that disagree, or
            overrides that do not apply.
        ValueError: Unknown ``quantization``.
    """
    from jobs.exports import load_export

    if quantization not in ("none", "int8"):
        raise ValueError(f"unknown quantization {quantization!r} (none|int8)")
    ex = load_export(
        export_dir,
        modalities=list(modalities),
        parts=None if parts is None else list(parts),
        feature_overrides=dict(features or {}),
    )
    for p in ex.model.parameters():
        p.requires_grad_(False)
    if quantization == "int8":
        ex.model = quantize_int8(ex.model).eval()
    return ex


def load_model(
    export_dir: str | Path,
    *,
    modalities: list[str] | None,
    quantization: str = "none",
    parts: list[str] | None = None,
) -> Any:
    """Loads (part of) the exported model in eval mode, optionally INT8 (benchmarks, tests).

    Args:
        export_dir: Export directory.
        modalities: Encoder branches to build (None = all).
        quantization: ``"none"`` or ``"int8"``.
        parts: Non-encoder parts to load (None = all).

    Returns:
        The ``models.OmniModel`` (or its quantized copy), ``requires_grad`` off.
    """
    mods = export_modalities(export_dir) if modalities is None else modalities
    return load_for_serving(
        export_dir, modalities=mods, parts=parts, quantization=quantization
    ).model


def resolve_templates(ex: Any, configured: list[str] | None) -> list[str]:
    """The zero-shot templates the service uses: the export's (what evaluation measured).

    Args:
        ex: The loaded :class:`jobs.exports.Export`.
        configured: ``OmniServeArgs.label_templates``: used only for an export written
            before exports carried ``zero_shot.yaml`` (logged); when the export has its own,
            a differing configured list is ignored, with a warning.
    """
    from jobs.exports import ZERO_SHOT_FILE

    if (Path(ex.path) / ZERO_SHOT_FILE).is_file() or not configured:
        if configured and list(configured) != list(ex.templates):
            logger.warning(
                "label_templates %s ignored: the export's zero-shot templates %s win",
                configured,
                ex.templates,
            )
        return list(ex.templates)
    logger.warning(
        "%s has no %s: zero-shot uses the configured label_templates %s",
        ex.path,
        ZERO_SHOT_FILE,
        configured,
    )
    return list(configured)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detached float32 (or bool) numpy copy of a tensor."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.numpy().copy()
    return t.float().numpy().copy()
