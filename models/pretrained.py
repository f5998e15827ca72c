"""Save and load an :class:`~models.model.OmniModel` in the export layout (Contract 3).

``model.safetensors`` (never pickled) and ``model_config.yaml``; a loader may rebuild only
some branches and parts (a serving replica holds one modality's branch and the trunk).
Export *directories* (featurizers, templates, the size check) are read by
``jobs.exports.load_export``, which calls :func:`load_pretrained` for the weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.config import OmniConfig

if TYPE_CHECKING:
    from models.model import OmniModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model_config.yaml"
#: ``model.safetensors`` metadata: JSON list of the modalities whose pretrained tower's
#: unchanged weights are not in the file but in the export's ``towers/<m>/`` (written by
#: ``jobs.exports``; the encoder loads them from there when it is built).
EXTERNAL_TOWERS_KEY = "external_towers"


def save_pretrained(model: OmniModel, directory: str | Path) -> Path:
    """Writes ``model.safetensors`` + ``model_config.yaml`` (no pickle).

    Raises:
        TypeError: The model is quantized (save the fp32 model instead).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor) or v.is_quantized:
            raise TypeError(
                f"cannot save {k!r}: quantized models are not saved; save the fp32 model"
            )
        state[k] = v.detach().contiguous().cpu()
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    model.config.save_yaml(directory / CONFIG_NAME)
    return directory


def read_config(directory: str | Path) -> OmniConfig:
    """``model_config.yaml`` of an export, with the pretrained towers it carries
    (``encoders.<m>.tower: towers/<m>``, relative) resolved against ``directory``."""
    from common.config import read_yaml

    directory = Path(directory)
    data = read_yaml(directory / CONFIG_NAME)
    for sec in (data.get("encoders") or {}).values():
        ref = sec.get("tower") if isinstance(sec, dict) else None
        if ref and not Path(ref).is_absolute() and (directory / ref).is_dir():
            sec["tower"] = str((directory / ref).resolve())
    return OmniConfig.from_dict(data)


def load_pretrained(
    directory: str | Path,
    modalities: Iterable[str] | None = None,
    parts: Iterable[str] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> OmniModel:
    """Rebuilds the model from an export directory, optionally only some branches.

    Args:
        directory: Holds ``model.safetensors`` and ``model_config.yaml``.
        modalities: Branches to load (default: all in the config).
        parts: Subset of ``models.model.PARTS`` to load (default: all); ``[]`` loads only
            the branches, the trunk and the temperature (a serving replica).
        map_location: Device of the loaded tensors.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: A file is missing. KeyError: the weights lack tensors the
            config's model has.
    """
    from safetensors.torch import load_file

    from models.model import build_model

    directory = Path(directory)
    wpath, cpath = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for p in (wpath, cpath):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (expected an export directory)")
    import json

    from safetensors import safe_open

    cfg = read_config(directory)
    model = build_model(cfg, modalities=modalities, parts=parts)
    state = load_file(str(wpath), device=str(map_location))
    with safe_open(str(wpath), framework="pt") as f:
        external = json.loads((f.metadata() or {}).get(EXTERNAL_TOWERS_KEY, "[]"))
    # Tower tensors kept only in towers/<m>/: the build just loaded them from there.
    from_towers = tuple(f"encoders.{m}.tower." for m in external)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(from_towers)]
    if missing:
        raise KeyError(f"{wpath} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()}, strict=True)
    return model.to(map_location).eval()
