"""The embedding directory of ``jobs.embed``: layout, model revision, parts, accounting.

::

    EMB_DIR/
      embed.json               model revision (export fingerprint), embedding size, source,
                               settings; what resume and the service check
      parts/part-00000.parquet id, label, modality, segment, start_s, end_s, embedding, fused
      parts/part-00000.json    the part's accounting and quarantine records
      quarantine.jsonl         every refused input (Contract 2 reasons)
      stats.json               totals over all parts (exact accounting)
      index/                   written by jobs.index (index.json + per-modality files)

A part is finished when its ``.parquet`` exists: it is written under a temporary name
and renamed after its ``.json``, so a killed job leaves no half part behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

META_FILE = "embed.json"
PARTS_DIR = "parts"
STATS_FILE = "stats.json"
QUARANTINE_FILE = "quarantine.jsonl"
INDEX_DIR = "index"
#: Columns of an output part (``embedding``/``fused``: list<float32>).
OUTPUT_COLUMNS = ("id", "label", "modality", "segment", "start_s", "end_s", "embedding", "fused")


class EmbeddingDirError(ValueError):
    """An embedding directory that cannot be used (missing, other model, other size)."""


def export_revision(export_dir: str | Path) -> str:
    """The model revision of an export: sha256 (first 16 hex digits) of the files that fix
    what an input embeds to (weights, model config, featurizer config, tokenizer)."""
    from jobs.exports import DATA_CONFIG_FILE, MODEL_CONFIG_FILE, WEIGHTS_FILE
    from pipelines.tokenizer import TOKENIZER_DIR

    d = Path(export_dir)
    h = hashlib.sha256()
    files = [d / WEIGHTS_FILE, d / MODEL_CONFIG_FILE, d / DATA_CONFIG_FILE]
    tok = d / TOKENIZER_DIR
    if tok.is_dir():
        files += sorted(p for p in tok.rglob("*") if p.is_file())
    for p in files:
        h.update(p.relative_to(d).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(2**22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def finished_parts(out: str | Path) -> set[int]:
    """Indices of the parts whose output is complete."""
    d = Path(out) / PARTS_DIR
    done = set()
    for p in d.glob("part-*.parquet"):
        if p.with_suffix(".json").is_file():
            done.add(int(p.stem.split("-")[1]))
    return done


def read_meta(out: str | Path) -> dict[str, Any] | None:
    p = Path(out) / META_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EmbeddingDirError(f"unreadable {p}: {e}") from e


def prepare_out(out: str | Path, meta: dict[str, Any], *, overwrite: bool) -> set[int]:
    """Creates or checks ``out`` for a run described by ``meta``.

    Returns:
        The finished parts to skip (none after ``overwrite``).

    Raises:
        EmbeddingDirError: ``out`` holds embeddings of another model revision or other
            settings (source, modalities, windows, parts) and ``overwrite`` is False.
    """
    d = Path(out)
    old = read_meta(d)
    if old is not None and not overwrite:
        if old.get("revision") != meta["revision"]:
            raise EmbeddingDirError(
                f"{d} holds embeddings of model revision {old.get('revision')}, the export "
                f"{meta['export']} is revision {meta['revision']}: pass --overwrite to "
                "re-embed everything, or choose another --out"
            )
        if old.get("settings") != meta["settings"]:
            diff = sorted(
                k
                for k in set(old.get("settings", {})) | set(meta["settings"])
                if old.get("settings", {}).get(k) != meta["settings"].get(k)
            )
            raise EmbeddingDirError(
                f"{d} was embedded with other settings ({', '.join(diff)} differ): pass "
                "--overwrite to re-embed everything, or choose another --out"
            )
    elif old is None and d.is_dir() and any(d.iterdir()) and not overwrite:
        raise EmbeddingDirError(
            f"{d} exists and is not an embedding directory ({META_FILE} missing): choose "
            "another --out or pass --overwrite"
        )
    if overwrite:
        for name in (PARTS_DIR, INDEX_DIR):
            shutil.rmtree(d / name, ignore_errors=True)
        for name in (META_FILE, STATS_FILE, QUARANTINE_FILE):
            (d / name).unlink(missing_ok=True)
    (d / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    # Any index or stats describe the previous parts: rebuilt at the end of this run.
    shutil.rmtree(d / INDEX_DIR, ignore_errors=True)
    for p in (d / PARTS_DIR).glob("*.tmp*"):
        p.unlink()
    tmp = d / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, d / META_FILE)
    return finished_parts(d)


class PartWriter:
    """Collects the embedded rows of the parts as they stream in (any order, any batch
    split) and writes each part when its meta row and all its segments have arrived.

    Memory: the rows of the parts in flight only (each row: ids and two vectors).
    """

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out) / PARTS_DIR
        self.pending: dict[int, list[pa.Table]] = {}
        self.meta: dict[int, dict[str, Any]] = {}
        self.counts: Counter = Counter()
        self.written: list[int] = []
        self.rows_read = 0

    def add(self, batch: pa.Table) -> None:
        parts = batch.column("_part").to_numpy()
        kinds = batch.column("_kind").to_pylist()
        for p in np.unique(parts).tolist():
            sel = np.flatnonzero(parts == p)
            piece = batch.take(pa.array(sel))
            for i in sel.tolist():
                if kinds[i] == "meta":
                    self.meta[p] = json.loads(batch.column("_meta")[i].as_py())
                else:
                    self.counts[p] += 1
            self.pending.setdefault(p, []).append(piece)
            self._maybe_write(p)

    def _maybe_write(self, p: int) -> None:
        meta = self.meta.get(p)
        if meta is None:
            return
        expected = sum(meta["segments"].values()) + meta["fused_rows"]
        if self.counts[p] < expected:
            return
        table = pa.concat_tables(self.pending.pop(p))
        write_part(self.dir, p, table, meta)
        self.written.append(p)
        self.rows_read += int(meta["rows_read"])
        del self.meta[p], self.counts[p]

    def close(self) -> None:
        if self.pending:
            raise RuntimeError(f"parts never completed: {sorted(self.pending)}")


def write_part(parts_dir: Path, p: int, table: pa.Table, meta: dict[str, Any]) -> None:
    """One part's output: segments sorted by (id, modality, segment), the fused embedding
    of a multi-modality row on its first record (its first modality, segment 0)."""
    kinds = table.column("_kind").to_pylist()
    seg_idx = [i for i, k in enumerate(kinds) if k == "seg"]
    segs = table.take(pa.array(seg_idx, type=pa.int64()))
    fused_of = {
        table.column("id")[i].as_py(): table.column("fused")[i]
        for i, k in enumerate(kinds)
        if k == "fuse"
    }
    segs = segs.sort_by([("id", "ascending"), ("modality", "ascending"), ("segment", "ascending")])
    fused_col: list[Any] = []
    seen: set[str] = set()
    for rid in segs.column("id").to_pylist():
        f = fused_of.get(rid) if rid not in seen else None
        seen.add(rid)
        fused_col.append(None if f is None else f.as_py())
    out = pa.table(
        {
            "id": segs.column("id"),
            "label": segs.column("label"),
            "modality": segs.column("modality"),
            "segment": segs.column("segment"),
            "start_s": segs.column("start_s"),
            "end_s": segs.column("end_s"),
            "embedding": segs.column("embedding").cast(pa.list_(pa.float32())),
            "fused": pa.array(fused_col, type=pa.list_(pa.float32())),
        }
    )
    name = part_name(p)
    with open(parts_dir / f"{name}.json", "w") as f:
        json.dump(meta, f, sort_keys=True)
    tmp = parts_dir / f"{name}.tmp.parquet"
    pq.write_table(out, tmp, compression="zstd")
    os.replace(tmp, parts_dir / f"{name}.parquet")


def drop_repeated_ids(out: str | Path) -> int:
    """Keeps each id's first part (parts are in input order): a later part holding an id
    of an earlier one is rewritten without it, and the row is counted as dropped with a
    ``duplicate_id`` record (repeats inside one part are caught while featurizing).

    Memory: the set of ids (one entry per embedded row), not their vectors.

    Returns:
        Rows dropped now.
    """
    seen: set[str] = set()
    dropped = 0
    for f in part_files(out):
        t = pq.read_table(f)
        ids = t.column("id").to_pylist()
        repeated = {i for i in ids if i in seen}
        seen.update(ids)
        if not repeated:
            continue
        meta_path = f.with_suffix(".json")
        meta = json.loads(meta_path.read_text())
        keep = pa.array([i not in repeated for i in ids], type=pa.bool_())
        gone = t.filter(pc.invert(keep))
        for m, n in Counter(gone.column("modality").to_pylist()).items():
            meta["segments"][m] -= n
        rows_mods = {
            (i, m)
            for i, m in zip(
                gone.column("id").to_pylist(), gone.column("modality").to_pylist(), strict=True
            )
        }
        for _, m in rows_mods:
            meta["items"][m] -= 1
        meta["fused_rows"] -= sum(1 for v in gone.column("fused").to_pylist() if v is not None)
        meta["rows_embedded"] -= len(repeated)
        meta["rows_dropped"] += len(repeated)
        meta["quarantine"] += [
            {"id": i, "modality": None, "path": None, "reason": "duplicate_id",
             "detail": f"id {i!r} repeated in the input (an earlier part holds it)"}
            for i in sorted(repeated)
        ]  # fmt: skip
        tmp = f.with_name(f.stem + ".tmp.parquet")
        pq.write_table(t.filter(keep), tmp, compression="zstd")
        meta_path.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, f)
        dropped += len(repeated)
    return dropped


def collect_stats(out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Totals over every finished part (this run's and earlier runs'), and the quarantine.

    Returns:
        ``(stats, quarantine records)``; ``stats["accounting"]["ok"]``: every row read is
        embedded or dropped with a recorded reason.
    """
    d = Path(out) / PARTS_DIR
    tot: dict[str, Any] = {
        "rows_read": 0,
        "rows_embedded": 0,
        "rows_dropped": 0,
        "fused_rows": 0,
    }
    seg, items, skipped, reasons = Counter(), Counter(), Counter(), Counter()
    by_mod: dict[str, Counter] = {}
    quarantine: list[dict[str, Any]] = []
    parts = sorted(d.glob("part-*.json"))
    for p in parts:
        if not p.with_suffix(".parquet").is_file():
            continue
        meta = json.loads(p.read_text())
        for k in tot:
            tot[k] += int(meta[k])
        seg.update(meta["segments"])
        items.update(meta["items"])
        skipped.update(meta["not_embedded"])
        for q in meta["quarantine"]:
            quarantine.append(q)
            reasons[q["reason"]] += 1
            by_mod.setdefault(q["modality"] or "row", Counter())[q["reason"]] += 1
    row_level = sum(1 for q in quarantine if q["modality"] is None)
    stats = {
        **tot,
        "parts": len(parts),
        "segments": dict(seg),
        "items": dict(items),
        "not_embedded_values": dict(skipped),
        "quarantined": {"total": len(quarantine), "by_reason": dict(reasons)},
        "quarantined_by_modality": {k: dict(v) for k, v in by_mod.items()},
        "accounting": {
            "ok": tot["rows_read"] == tot["rows_embedded"] + tot["rows_dropped"]
            and row_level == tot["rows_dropped"],
            "rows_read": tot["rows_read"],
            "embedded_plus_dropped": tot["rows_embedded"] + tot["rows_dropped"],
            "row_level_records": row_level,
        },
    }
    return stats, quarantine


# --------------------------------------------------------------------------- reading


def check_embedding_dir(
    path: str | Path, *, revision: str | None = None, dim: int | None = None
) -> dict[str, Any]:
    """The ``embed.json`` of a complete embedding directory, checked against a model.

    Raises:
        EmbeddingDirError: missing directory or files, no finished part, or another model
            revision / embedding size than asked for (the message names both).
    """
    d = Path(path)
    if not d.is_dir():
        raise EmbeddingDirError(f"embedding directory not found: {d}")
    meta = read_meta(d)
    if meta is None:
        raise EmbeddingDirError(
            f"{d / META_FILE} not found: {d} is not an embedding directory of `python -m jobs.embed`"
        )
    if not (d / STATS_FILE).is_file():
        raise EmbeddingDirError(
            f"{d / STATS_FILE} not found: the jobs.embed run into {d} did not finish (re-run it)"
        )
    if revision is not None and meta.get("revision") != revision:
        raise EmbeddingDirError(
            f"{d} was embedded by model revision {meta.get('revision')} "
            f"({meta.get('export')}), the served export is revision {revision}: "
            "re-run jobs.embed with this export"
        )
    if dim is not None and int(meta.get("embed_dim", -1)) != int(dim):
        raise EmbeddingDirError(
            f"{d} holds {meta.get('embed_dim')}-dim embeddings, the served model makes "
            f"{dim}-dim ones"
        )
    if not finished_parts(d):
        raise EmbeddingDirError(f"{d / PARTS_DIR} holds no finished part")
    return meta


def part_files(path: str | Path) -> list[Path]:
    d = Path(path) / PARTS_DIR
    return sorted(
        p
        for p in d.glob("part-*.parquet")
        if ".tmp" not in p.name and p.with_suffix(".json").is_file()
    )


def read_embeddings(path: str | Path, modality: str | None = None, *, vectors: bool = True):
    """Records (and vectors) of one modality (``None``: all) in part order.

    Returns:
        ``(meta table with id, label, modality, segment, start_s, end_s; (N, E) float32
        array or None)``; the index's row i is record i.
    """
    cols = ["id", "label", "modality", "segment", "start_s", "end_s"]
    metas, vecs = [], []
    for f in part_files(path):
        t = pq.read_table(f, columns=cols + (["embedding"] if vectors else []))
        if modality is not None:
            t = t.filter(pc.equal(t.column("modality"), modality))
        if vectors:
            e = t.column("embedding").combine_chunks()
            dim = len(e[0].as_py()) if len(e) else 0
            vecs.append(e.values.to_numpy(zero_copy_only=False).reshape(-1, dim) if dim else None)
            t = t.drop_columns(["embedding"])
        metas.append(t)
    meta = pa.concat_tables(metas) if metas else pa.table({c: [] for c in cols})
    if not vectors:
        return meta, None
    vs = [v for v in vecs if v is not None]
    arr = np.concatenate(vs).astype(np.float32, copy=False) if vs else np.zeros((0, 0), np.float32)
    return meta, arr
