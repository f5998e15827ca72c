"""The two Ray Data stages of ``jobs.embed``.

1. :func:`featurize_part` (tasks, one part per call): reads a part (:mod:`jobs.embedding.parts`)
   and featurizes it with the **export's** featurizers, through the same row logic as
   ``jobs.prepare`` (:class:`pipelines.stages.DecodeRows`: id and split checks, the path
   resolver, the same quarantine reasons), cutting long media into windows. Output: one
   row per segment to embed (``_kind = seg``), one per multi-modality row to fuse
   (``fuse``) and one ``meta`` row holding the part's accounting and quarantine records.
2. :class:`EmbedActor` (an actor pool; ``map_batches`` with a class UDF): holds the model
   loaded once from the export (:func:`jobs.exports.load_export`) on CPU or GPU and turns
   the featurized rows into embeddings (``encode_features``, as a serving replica does)
   and fused embeddings (``encode_many`` + ``fuse_features``).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.featurize import SampleError
from pipelines.stages import DecodeRows, _absent, _suffix, pipeline_modalities, record

#: Columns every stage-1 output row has besides the modalities' tensor columns.
ROW_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("_part", pa.int32()),
    ("_kind", pa.string()),
    ("id", pa.string()),
    ("label", pa.string()),
    ("modality", pa.string()),
    ("segment", pa.int32()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("_meta", pa.string()),
)


class SegmentRows(DecodeRows):
    """:class:`DecodeRows` whose per-modality step featurizes with the export's featurizers
    (stage 1 and 2 in one go: the tokenizer and the fitted statistics are the export's) and
    cuts windowed modalities into segments.

    Args:
        config: A ``DataConfig`` dict whose ``features`` are the export's.
        root, jsonl, source: As :class:`DecodeRows`.
        featurizers: ``{modality: featurizer}`` of the export (the modalities embedded).
        windows: ``{modality: WindowConfig dict}``.
    """

    def __init__(
        self,
        config: dict[str, Any],
        root: str,
        jsonl: bool,
        source: str,
        featurizers: dict[str, Any],
        windows: dict[str, dict[str, Any]],
    ) -> None:
        super().__init__(config, root, jsonl, source)
        self.export_featurizers = featurizers
        self.modalities = tuple(m for m in pipeline_modalities() if m in featurizers)
        self.windows = windows

    def parse(self, batch: pa.Table) -> list[dict[str, Any]]:
        """Raw manifest rows of a batch (JSONL lines parsed, columns checked)."""
        if self.jsonl:
            return [self._parse_line(line) for line in batch.column("text").to_pylist()]
        self._check_columns(batch.column_names)
        return batch.to_pylist()

    def _modality(self, m: str, value: Any, inline: bool, out: dict[str, Any]) -> None:
        f = self.export_featurizers[m]
        if inline:
            raw, suffix = value, None
        else:
            if not isinstance(value, str):
                raise SampleError(
                    "bad_path", f"{m} must be a path string, got {type(value).__name__}"
                )
            raw = self.resolver.read(value, self.cfg.features.max_file_bytes)
            suffix = _suffix(value) or f.sniff(raw)
        w = self.windows.get(m)
        if w is not None and f.windowed:
            hop = w.get("hop") or w["seconds"]
            pieces = f.decode_windows(
                raw, suffix, window_s=w["seconds"], hop_s=hop, rate_hz=w.get("rate_hz")
            )
            segs = [(s, e, f.finalize(item)) for s, e, item in pieces]
            if len(segs) > 1:
                out.setdefault("_raw", {})[m] = (raw, suffix)
        else:
            segs = [(None, None, f.finalize(f.decode(raw, suffix)))]
        out["_item"][m] = segs


_FEATURIZERS: dict[str, Any] = {}


def _segment_rows(ctx: dict[str, Any]) -> SegmentRows:
    """One :class:`SegmentRows` per worker process and job set-up (cached like prepare's
    decoder: warm workers keep it between tasks)."""
    key = json.dumps(ctx, sort_keys=True, default=str)
    dec = _FEATURIZERS.get(key)
    if dec is None:
        from common.config import to_dict
        from jobs.exports import MODEL_CONFIG_FILE, load_featurizers
        from models import OmniConfig
        from pipelines.config import DataConfig

        _FEATURIZERS.clear()
        config = OmniConfig.from_yaml(f"{ctx['export']}/{MODEL_CONFIG_FILE}")
        features, feats = load_featurizers(ctx["export"], config, ctx["modalities"])
        data_cfg = DataConfig(
            features=features,
            extra_roots=list(ctx["extra_roots"]),
            unknown_columns=ctx["unknown_columns"],
        )
        dec = _FEATURIZERS[key] = SegmentRows(
            to_dict(data_cfg), ctx["root"], ctx["jsonl"], ctx["source"], feats, ctx["windows"]
        )
    return dec


def featurize_part(batch: dict[str, np.ndarray], ctx: dict[str, Any]) -> pa.Table:
    """Task UDF: one part descriptor (a one-row batch) -> its featurized rows + meta row.

    Args:
        batch: ``{"index": [i], "kind": [...], "path": [...], ...}`` (a :class:`Part`).
        ctx: The job's set-up (export, modalities, windows, root, source, ``fuse``...).
    """
    from jobs.embedding.parts import read_part

    part = {k: (v[0].item() if hasattr(v[0], "item") else v[0]) for k, v in batch.items()}
    if part["kind"] == "shard":
        rows, meta = _shard_rows(part["path"], ctx)
    else:
        rows, meta = _manifest_rows(read_part(part), ctx)
    meta["part"] = int(part["index"])
    return _to_table(int(part["index"]), rows, meta, ctx["modalities"])


def _new_meta() -> dict[str, Any]:
    return {
        "rows_read": 0,
        "rows_embedded": 0,
        "rows_dropped": 0,
        "segments": Counter(),
        "items": Counter(),
        "fused_rows": 0,
        "not_embedded": Counter(),
        "quarantine": [],
    }


def _manifest_rows(table: pa.Table, ctx: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    dec = _segment_rows(ctx)
    meta = _new_meta()
    raws = dec.parse(table)
    meta["rows_read"] = len(raws)
    skipped = [m for m in pipeline_modalities() if m not in dec.modalities]
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for raw in raws:
        o = dec._row(raw)
        meta["quarantine"].extend(o["_quarantine"])
        rid = o.get("id")
        if o.get("_row_error"):
            meta["quarantine"].append(o["_row_error"])
            meta["rows_dropped"] += 1
            continue
        for m in skipped:
            if not _absent(raw.get(m)):
                meta["not_embedded"][m] += 1
        if rid in seen:
            meta["quarantine"].append(
                record(rid, None, None, "duplicate_id", f"id {rid!r} repeated in the input")
            )
            meta["rows_dropped"] += 1
            continue
        seen.add(rid)
        present = [m for m in dec.modalities if m in o["_item"]]
        if not present:
            failed = [q["modality"] for q in o["_quarantine"]]
            meta["quarantine"].append(
                record(rid, None, None, "no_valid_modality", f"failed: {failed}" if failed else "")
            )
            meta["rows_dropped"] += 1
            continue
        fuse_items = None
        if ctx["fuse"] and len(present) > 1:
            fuse_items = {}
            for m in present:
                if m in o.get("_raw", {}):  # windowed into several segments: the whole item
                    raw_m, suffix = o["_raw"][m]
                    fuse_items[m] = dec.export_featurizers[m].featurize(raw_m, suffix)
                else:
                    fuse_items[m] = o["_item"][m][0][2]
        _emit(out, meta, rid, o.get("label"), {m: o["_item"][m] for m in present}, fuse_items)
    return out, meta


def _shard_rows(path: str, ctx: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    import pyarrow.parquet as pq

    from pipelines.schema import read_shard, shard_modalities

    table = pq.read_table(path)
    mods = [m for m in ctx["modalities"] if m in shard_modalities(table)]
    cols = read_shard(table, mods)
    meta = _new_meta()
    ids = cols["id"]
    labels = cols.get("label") or [None] * len(ids)
    meta["rows_read"] = len(ids)
    out: list[dict[str, Any]] = []
    for i, rid in enumerate(ids):
        items = {m: [(None, None, cols[m][i])] for m in mods if cols[m][i] is not None}
        if not items:
            meta["quarantine"].append(
                record(rid, None, path, "no_valid_modality", "no embedded modality in the row")
            )
            meta["rows_dropped"] += 1
            continue
        fuse_items = (
            {m: v[0][2] for m, v in items.items()} if ctx["fuse"] and len(items) > 1 else None
        )
        _emit(out, meta, rid, labels[i], items, fuse_items)
    return out, meta


def _emit(
    out: list[dict[str, Any]],
    meta: dict[str, Any],
    rid: str,
    label: str | None,
    items: dict[str, list[tuple[float | None, float | None, np.ndarray]]],
    fuse_items: dict[str, np.ndarray] | None,
) -> None:
    meta["rows_embedded"] += 1
    for m, segs in items.items():
        meta["items"][m] += 1
        meta["segments"][m] += len(segs)
        for k, (s, e, arr) in enumerate(segs):
            out.append(
                {
                    "_kind": "seg",
                    "id": rid,
                    "label": label,
                    "modality": m,
                    "segment": k,
                    "start_s": None if s is None else float(s),
                    "end_s": None if e is None else float(e),
                    "_arrays": {m: arr},
                }
            )
    if fuse_items is not None:
        meta["fused_rows"] += 1
        out.append(
            {
                "_kind": "fuse",
                "id": rid,
                "label": label,
                "modality": "+".join(fuse_items),
                "segment": 0,
                "_arrays": fuse_items,
            }
        )


def _to_table(part: int, rows: list[dict], meta: dict[str, Any], modalities: list[str]) -> pa.Table:
    from pipelines.schema import pack_tensors

    meta = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in meta.items()}
    rows = rows + [{"_kind": "meta", "_meta": json.dumps(meta, default=str)}]
    cols: dict[str, pa.Array] = {}
    for name, typ in ROW_COLUMNS:
        if name == "_part":
            cols[name] = pa.array([part] * len(rows), type=typ)
        else:
            cols[name] = pa.array([r.get(name) for r in rows], type=typ)
    for m in modalities:
        data, shape = pack_tensors(m, [r.get("_arrays", {}).get(m) for r in rows])
        cols[m], cols[f"{m}_shape"] = data, shape
    return pa.table(cols)


class EmbedActor:
    """Class UDF of the embedding actor pool: the model, loaded once per actor.

    Args:
        export: Export directory.
        modalities: Branches to load.
        fuse: Load the fusion part (for ``fuse`` rows).
        device: ``cpu`` or ``cuda``.
        batch_size: Segments per model call.
        torch_threads: Intra-op threads.
    """

    def __init__(
        self,
        export: str,
        modalities: list[str],
        fuse: bool,
        device: str,
        batch_size: int,
        torch_threads: int,
    ) -> None:
        import torch

        from jobs.exports import load_export

        torch.set_num_threads(torch_threads)
        ex = load_export(
            export, device=device, modalities=modalities, parts=["fusion"] if fuse else []
        )
        for p in ex.model.parameters():
            p.requires_grad_(False)
        self.model = ex.model
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.device = device

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from models.data import collate
        from pipelines.schema import unpack_column

        n = batch.num_rows
        kinds = batch.column("_kind").to_pylist()
        emb: list[list[float] | None] = [None] * n
        fused: list[list[float] | None] = [None] * n
        arrays = {
            m: unpack_column(m, batch.column(m), batch.column(f"{m}_shape"))
            for m in self.modalities
        }
        seg_rows: dict[str, list[int]] = {}
        fuse_rows: dict[tuple[str, ...], list[int]] = {}
        for i, k in enumerate(kinds):
            present = tuple(m for m in self.modalities if arrays[m][i] is not None)
            if k == "seg":
                seg_rows.setdefault(present[0], []).append(i)
            elif k == "fuse":
                fuse_rows.setdefault(present, []).append(i)
        bs = self.batch_size
        with torch.inference_mode():
            for m, idx in seg_rows.items():
                for s in range(0, len(idx), bs):
                    chunk = idx[s : s + bs]
                    b = collate([{m: arrays[m][i]} for i in chunk], modalities=(m,))
                    b = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in b.items()}
                    e = self.model.encode_features(m, b).embed.float().cpu().numpy()
                    for i, row in zip(chunk, e, strict=True):
                        emb[i] = row
            for combo, idx in fuse_rows.items():
                for s in range(0, len(idx), bs):
                    chunk = idx[s : s + bs]
                    b = collate([{m: arrays[m][i] for m in combo} for i in chunk], modalities=combo)
                    b = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in b.items()}
                    f, _ = self.model.fuse_features(self.model.encode_many(b, combo))
                    for i, row in zip(chunk, f.float().cpu().numpy(), strict=True):
                        fused[i] = row
        keep = [name for name, _ in ROW_COLUMNS]
        out = batch.select(keep)
        out = out.append_column("embedding", _vectors(emb))
        return out.append_column("fused", _vectors(fused))


def _vectors(rows: list[np.ndarray | None]) -> pa.Array:
    """``list<float32>`` column (null where ``None``)."""
    dim = next((len(r) for r in rows if r is not None), 0)
    flat = np.concatenate([r for r in rows if r is not None]) if dim else np.zeros(0, np.float32)
    offsets = np.zeros(len(rows) + 1, np.int32)
    offsets[1:] = np.cumsum([0 if r is None else len(r) for r in rows])
    mask = pa.array([r is None for r in rows], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float32)), mask=mask)
