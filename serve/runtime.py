"""Loading what a replica needs from an export directory (Contract 3), and INT8.

Replicas load only their part: a modality replica calls :func:`load_model` with
``modalities=[m]`` (``OmniModel.from_pretrained`` then builds just that branch), the fusion
replica loads the fusion/decoder/heads. Nothing here unpickles: weights are safetensors,
configs YAML, the tokenizer JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("omniray.serve")

REQUIRED_EXPORT_FILES: tuple[str, ...] = ("model.safetensors", "model_config.yaml")


def check_export_dir(export_dir: str | Path) -> Path:
    """Fails early (in the driver) with a clear message when the export is incomplete.

    Raises:
        FileNotFoundError: The directory or one of its required files is missing.
    """
    p = Path(export_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"export dir {p} does not exist (run jobs.export first)")
    missing = [f for f in REQUIRED_EXPORT_FILES if not (p / f).is_file()]
    if not (p / "tokenizer").is_dir():
        missing.append("tokenizer/")
    if missing:
        raise FileNotFoundError(f"export dir {p} lacks {missing} (Contract 3)")
    return p


def load_feature_config(export_dir: str | Path):
    """The featurization config the model was trained with (``data_config.yaml``).

    Only the ``features`` section is read: serving needs nothing else, and an export must
    stay loadable when unrelated sections of ``DataConfig`` (execution, dedupe, ...) change.

    Returns:
        ``pipelines.config.FeatureConfig``; defaults (with a warning) if the export has
        no ``data_config.yaml``.

    Raises:
        common.config.ConfigError: The ``features`` section does not validate.
    """
    from pipelines.config import FeatureConfig
    from pipelines.config import load_feature_config as load_features

    path = Path(export_dir) / "data_config.yaml"
    if not path.is_file():
        logger.warning("%s missing: featurizing with FeatureConfig defaults", path)
        return FeatureConfig()
    return load_features(path)


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


def load_model(
    export_dir: str | Path,
    *,
    modalities: list[str] | None,
    quantization: str = "none",
    parts: list[str] | None = None,
) -> Any:
    """Loads (part of) the exported model in eval mode, optionally INT8.

    Args:
        export_dir: Export directory.
        modalities: Encoder branches to build (None = all).
        quantization: ``"none"`` or ``"int8"``.
        parts: Non-encoder parts to load (passed to ``from_pretrained``; None = its default).

    Returns:
        The ``models.OmniModel`` (or its quantized copy), ``requires_grad`` off.
    """
    from models.model import OmniModel

    kwargs: dict[str, Any] = {"modalities": modalities}
    if parts is not None:
        kwargs["parts"] = parts
    model = OmniModel.from_pretrained(str(export_dir), **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if quantization == "int8":
        model = quantize_int8(model)
        model.eval()
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r} (none|int8)")
    return model


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detached float32 (or bool) numpy copy of a tensor."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.numpy().copy()
    return t.float().numpy().copy()
