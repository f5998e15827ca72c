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

from common.modalities import MODALITIES, Modality

IGNORE_LABEL = -100


def _check_item(rec: Modality, i: int, x: Any) -> np.ndarray:
    m = rec.name
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"sample {i}: {m} is not a numeric array (dtype=object)")
    if arr.ndim != rec.rank:
        raise ValueError(f"sample {i}: {m} must have {rec.rank} dims, got shape {tuple(arr.shape)}")
    if np.issubdtype(rec.np_dtype, np.integer) and rec.np_dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"sample {i}: {m} must be integer ids, got {arr.dtype}")
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"sample {i}: {m} must be numeric, got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"sample {i}: {m} contains NaN or Inf")
    if arr.size == 0:
        raise ValueError(f"sample {i}: {m} is empty")
    return arr


def batch_dtype(rec: Modality, items: Sequence[np.ndarray]) -> np.dtype:
    """The batch dtype of a modality, from its record: integer ids -> int64, uint8 stays
    uint8 (the encoder scales pixels; keeps the batch 4x smaller) when every item is uint8,
    anything else float32."""
    if np.issubdtype(rec.np_dtype, np.integer) and rec.np_dtype != np.uint8:
        return np.dtype(np.int64)
    if rec.np_dtype == np.uint8 and all(x.dtype == np.uint8 for x in items):
        return np.dtype(np.uint8)
    return np.dtype(np.float32)


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
    pad_values: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Stacks featurized samples into a model batch, by each modality's record
    (``common.modalities``: rank, varying axis, mask, dtype).

    Args:
        samples: One mapping per row: modality -> ``np.ndarray`` or None, optional
            ``"label"`` (str, or int when ``label_names`` is None).
        modalities: Modalities to collate (default: every declared modality that appears).
        label_names: Class names; a label's index in this list becomes ``batch["label"]``
            (-100 when unknown or absent).
        pad_values: Value that fills padded positions of a modality (default 0, which is
            also the text pad id of INTERFACES §1).

    Returns:
        ``batch[m]`` ``(B, ...)`` (int64 for integer records, uint8 for uint8 records,
        float32 otherwise, padded to the longest item along the record's ``var_axis``),
        ``batch[f"{m}_mask"]`` ``(B, T)`` for ``masked`` records (and for any varying axis
        when lengths differ), ``batch[f"{m}_present"]`` ``(B,)`` bool and
        ``batch["label"]`` ``(B,)`` int64. A modality no sample has only gets an all-False
        ``_present`` entry.

    Raises:
        ValueError: Empty batch, unknown modality, wrong rank/dtype, non-finite values or
            mismatched fixed dimensions (naming the sample and modality).
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    if modalities is None:
        modalities = [m for m in MODALITIES if any(s.get(m) is not None for s in samples)]
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
    b = len(samples)
    pads = pad_values or {}
    batch: dict[str, torch.Tensor] = {}
    for m in modalities:
        rec = MODALITIES[m]
        items = [
            None if s.get(m) is None else _check_item(rec, i, s[m]) for i, s in enumerate(samples)
        ]
        present = torch.tensor([x is not None for x in items], dtype=torch.bool)
        batch[f"{m}_present"] = present
        real = [x for x in items if x is not None]
        if not real:
            continue
        ax = rec.var_axis
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
        out = np.full((b, *shape), pads.get(m, 0), dtype=batch_dtype(rec, real))
        for i, x in enumerate(items):
            if x is None:
                continue
            if ax is None:
                out[i] = x
            else:
                out[i, : x.shape[ax]] = x
        batch[m] = torch.from_numpy(out)
        if ax is not None and (
            rec.masked or len({n for n, x in zip(lengths, items, strict=True) if x is not None}) > 1
        ):
            steps = torch.arange(longest)[None, :]
            batch[f"{m}_mask"] = steps < torch.tensor(lengths)[:, None]
    # Cached frozen-tower features (``common.towers.CACHE_SUFFIX``): float (N, h) per row,
    # padded on N with a mask; rows without them get zeros and an all-False mask.
    for m in modalities:
        key = f"{m}__tower"
        feats = [s.get(key) for s in samples]
        if all(f is None for f in feats):
            continue
        if any(f is None for f in feats if True) and any(
            s.get(m) is not None and s.get(key) is None for s in samples
        ):
            continue  # a partial cache: the tower runs instead
        h = next(f for f in feats if f is not None).shape[-1]
        n = max(0 if f is None else f.shape[0] for f in feats)
        out = np.zeros((b, n, h), dtype=np.float32)
        lens = [0 if f is None else f.shape[0] for f in feats]
        for i, f in enumerate(feats):
            if f is not None:
                out[i, : f.shape[0]] = f
        batch[key] = torch.from_numpy(out)
        batch[f"{key}_mask"] = torch.arange(n)[None, :] < torch.tensor(lens)[:, None]
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
    """Random featurized samples that fit ``cfg``'s encoders (each encoder's
    ``random_item``: its largest input, random lengths for masked modalities).

    For smoke tests and benchmarks (no real data, no label signal).

    Args:
        cfg: An :class:`~models.config.OmniConfig`.
        n: Number of samples.
        seed: RNG seed.
        modalities: Modalities to fill (default ``cfg.modalities``).
        drop_one: Row ``i`` lacks modality ``i % M`` (exercises missing-modality paths).
        num_labels: Labels are ``str(i % num_labels)``.
    """
    from models.encoders import encoder_class

    rng = np.random.default_rng(seed)
    mods = list(cfg.modalities if modalities is None else modalities)
    sections = {m: cfg.encoder_section(m) for m in mods}
    out = []
    for i in range(n):
        s: dict[str, Any] = {"label": str(i % num_labels)}
        for m in mods:
            s[m] = encoder_class(m, sections[m]).random_item(cfg, sections[m], rng)
        if drop_one and mods:
            s[mods[i % len(mods)]] = None
        out.append(s)
    return out
