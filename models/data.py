"""``collate``: featurized numpy samples -> padded torch batch (INTERFACES §4).

Used by training, evaluation and serving alike so that every consumer builds batches the
same way. Each sample maps modality -> featurized ``np.ndarray`` (or None) and may carry a
``"label"``. Rows lacking a modality are zero-filled and flagged in ``batch[f"{m}_present"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from models.config import ALL_MODALITIES

#: Expected number of dimensions of one featurized item.
ITEM_NDIM: dict[str, int] = {
    "text": 1,
    "image": 3,
    "audio": 2,
    "video": 4,
    "pointcloud": 2,
    "signal": 2,
}
#: Axis padded to the longest item (variable-length modalities get a ``_mask``).
PAD_AXIS: dict[str, int] = {"text": 0, "audio": 0, "pointcloud": 0}
MASKED: tuple[str, ...] = ("text", "audio")
IGNORE_LABEL = -100


def _check_item(m: str, i: int, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"sample {i}: {m} is not a numeric array (dtype=object)")
    if arr.ndim != ITEM_NDIM[m]:
        raise ValueError(
            f"sample {i}: {m} must have {ITEM_NDIM[m]} dims, got shape {tuple(arr.shape)}"
        )
    if m == "text":
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"sample {i}: text must be integer token ids, got {arr.dtype}")
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"sample {i}: {m} must be numeric, got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"sample {i}: {m} contains NaN or Inf")
    if arr.size == 0:
        raise ValueError(f"sample {i}: {m} is empty")
    return arr


def _label_index(label: Any, label_names: Sequence[str] | None) -> int:
    if label is None:
        return IGNORE_LABEL
    if label_names is not None:
        names = list(label_names)
        return names.index(str(label)) if str(label) in names else IGNORE_LABEL
    if isinstance(label, int | np.integer) and not isinstance(label, bool):
        return int(label)
    return IGNORE_LABEL


def collate(
    samples: Sequence[Mapping[str, Any]],
    modalities: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Stacks featurized samples into a model batch.

    Args:
        samples: One mapping per row: modality -> ``np.ndarray`` or None, optional
            ``"label"`` (str, or int when ``label_names`` is None).
        modalities: Modalities to collate (default: every known modality that appears).
        label_names: Class names; a label's index in this list becomes ``batch["label"]``
            (-100 when unknown or absent).

    Returns:
        ``batch[m]`` ``(B, ...)`` (int64 text, uint8 image/video, float32 otherwise, padded
        to the longest item), ``batch[f"{m}_mask"]`` ``(B, T)`` for text/audio (and
        pointcloud when lengths differ), ``batch[f"{m}_present"]`` ``(B,)`` bool and
        ``batch["label"]`` ``(B,)`` int64. A modality no sample has only gets an all-False
        ``_present`` entry.

    Raises:
        ValueError: Empty batch, unknown modality, wrong rank/dtype, non-finite values or
            mismatched fixed dimensions (naming the sample and modality).
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    if modalities is None:
        modalities = [m for m in ALL_MODALITIES if any(s.get(m) is not None for s in samples)]
    unknown = [m for m in modalities if m not in ALL_MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {list(ALL_MODALITIES)}")
    b = len(samples)
    batch: dict[str, torch.Tensor] = {}
    for m in modalities:
        items = [
            None if s.get(m) is None else _check_item(m, i, s[m]) for i, s in enumerate(samples)
        ]
        present = torch.tensor([x is not None for x in items], dtype=torch.bool)
        batch[f"{m}_present"] = present
        real = [x for x in items if x is not None]
        if not real:
            continue
        ax = PAD_AXIS.get(m)
        ref = real[0].shape
        fixed = [d for j, d in enumerate(ref) if j != ax]
        for i, x in enumerate(items):
            if x is not None and [d for j, d in enumerate(x.shape) if j != ax] != fixed:
                raise ValueError(
                    f"sample {i}: {m} shape {tuple(x.shape)} does not match {tuple(ref)} "
                    f"(only axis {ax} may vary)"
                )
        lengths = [0 if x is None else (x.shape[ax] if ax is not None else 1) for x in items]
        longest = max(lengths) if ax is not None else None
        shape = list(ref)
        if ax is not None:
            shape[ax] = longest
        if m == "text":
            dtype = np.int64
        elif m in ("image", "video") and all(x.dtype == np.uint8 for x in real):
            dtype = np.uint8  # the encoder scales pixels; keeps the batch 4x smaller
        else:
            dtype = np.float32
        out = np.zeros((b, *shape), dtype=dtype)  # text pad id is 0
        for i, x in enumerate(items):
            if x is None:
                continue
            if ax is None:
                out[i] = x
            else:
                out[i, : x.shape[ax]] = x
        batch[m] = torch.from_numpy(out)
        if ax is not None and (
            m in MASKED
            or len({n for n, x in zip(lengths, items, strict=True) if x is not None}) > 1
        ):
            steps = torch.arange(longest)[None, :]
            batch[f"{m}_mask"] = steps < torch.tensor(lengths)[:, None]
    batch["label"] = torch.tensor(
        [_label_index(s.get("label"), label_names) for s in samples], dtype=torch.long
    )
    return batch


def synthetic_samples(
    cfg: Any,
    n: int,
    *,
    seed: int = 0,
    modalities: Sequence[str] | None = None,
    drop_one: bool = False,
    num_labels: int = 10,
) -> list[dict[str, Any]]:
    """Random featurized samples with the shapes/dtypes of INTERFACES §1 for ``cfg``.

    For smoke tests and benchmarks (no real data). Text and audio get variable lengths.

    Args:
        cfg: An :class:`~models.config.OmniConfig`.
        n: Number of samples.
        seed: RNG seed.
        modalities: Modalities to fill (default ``cfg.modalities``).
        drop_one: Row ``i`` lacks modality ``i % M`` (exercises missing-modality paths).
        num_labels: Labels are ``str(i % num_labels)``.
    """
    rng = np.random.default_rng(seed)
    mods = list(cfg.modalities if modalities is None else modalities)
    out = []
    for i in range(n):
        s: dict[str, Any] = {"label": str(i % num_labels)}
        for m in mods:
            if m == "text":
                length = int(rng.integers(4, cfg.max_text_len + 1))
                ids = rng.integers(5, cfg.vocab_size, size=length)
                ids[0], ids[-1] = cfg.bos_id, cfg.eos_id
                s[m] = ids.astype(np.int32)
            elif m == "image":
                s[m] = rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
            elif m == "audio":
                t = int(rng.integers(cfg.audio_max_frames // 2, cfg.audio_max_frames + 1))
                s[m] = rng.standard_normal((t, cfg.audio_bins)).astype(np.float16)
            elif m == "video":
                shape = (cfg.video_frames, cfg.video_size, cfg.video_size, 3)
                s[m] = rng.integers(0, 256, shape, dtype=np.uint8)
            elif m == "pointcloud":
                p = rng.standard_normal((cfg.pointcloud_points, cfg.pointcloud_channels))
                p[:, :3] /= np.abs(p[:, :3]).max()
                s[m] = p.astype(np.float16)
            elif m == "signal":
                shape = (cfg.signal_channels, cfg.signal_length)
                s[m] = rng.standard_normal(shape).astype(np.float16)
        if drop_one and mods:
            s[mods[i % len(mods)]] = None
        out.append(s)
    return out
