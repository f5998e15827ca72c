"""The stages of ``prepare`` (run inside workers; pure functions of a batch).

1. :class:`DecodeRows` (via :func:`decode_block`, one plain Ray task per block read by Ray
   Data, or :func:`decode_batch`, a ``map_batches`` UDF): manifest rows -> each modality's stage-1
   (decoded) form + dedupe keys + quarantine records. Every failure is caught per
   modality; a bad file never takes the worker down.
2. :class:`FinalizeRows` (via :func:`finalize_batch`): applies the driver's plan
   (duplicates, dropped rows, split and shard), finalizes the two-phase modalities
   (tokenizer, fitted statistics), lists each row's modalities.
3. :func:`finalize_and_route` (2 + :func:`pipelines.shards.route_block`) +
   :func:`pipelines.shards.write_group`: each block's rows finalized and routed to their
   ``(split, shard)`` in one task, then one task per group writes it, sorted by id under a
   deterministic name.

No modality is named here: what differs between modalities is a featurizer property
(``accepts_inline``, ``decoded_dtype``, ``tokenized``, ``near_dedupe``, ``caption_key``...).
"""

from __future__ import annotations

import json
import math
import re
import traceback
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from common.modalities import modality_names
from pipelines.config import DataConfig
from pipelines.dedupe import near_key, near_modalities
from pipelines.featurize import FEATURIZERS, Featurizer, SampleError, get_featurizer
from pipelines.paths import PathResolver
from pipelines.schema import arrow_type, pack_tensors, unpack_column
from pipelines.shards import route_block, shard_of
from pipelines.splits import parse_split

#: Manifest columns that are not modalities (``split``: ``train``/``val``/``test`` fixes the
#: row's split; empty: prepare assigns one).
META_COLUMNS: tuple[str, ...] = ("id", "label", "group", "split")
#: Columns Ray Data may add to what it reads.
_IGNORED_COLUMNS: frozenset[str] = frozenset({"path"})
#: A JSON string escape of a UTF-16 surrogate: the only way JSON text makes a Python string
#: that is not valid Unicode (which Arrow cannot store).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def pipeline_modalities() -> tuple[str, ...]:
    """The declared modalities that have a featurizer, in table order."""
    return tuple(m for m in modality_names() if m in FEATURIZERS)


def known_columns() -> frozenset[str]:
    """Manifest columns prepare understands: :data:`META_COLUMNS` and the modalities."""
    return frozenset(META_COLUMNS) | frozenset(pipeline_modalities())


class ManifestError(ValueError):
    """A manifest that cannot be processed as a whole (clear message, job stops)."""


def decoded_type(m: str) -> pa.DataType:
    """Arrow type of modality ``m``'s stage-1 (decoded) column."""
    dd = FEATURIZERS[m].decoded_dtype
    return pa.string() if dd == "str" else arrow_type(m, dd)


def key_columns() -> list[str]:
    """The small per-row stage-1 columns the driver plans from."""
    cols = ["id", "label", "group", "split", "_row_error", "_quarantine", "_present", "_src"]
    cols += ["_unknown", "_cleaned"]
    for m in pipeline_modalities():
        cols += [f"_hash_{m}", f"_near_{m}", f"_caption_{m}"]
    return cols


def stage1_schema() -> pa.Schema:
    """Schema of :class:`DecodeRows` output."""
    fields = [
        pa.field("id", pa.string()),
        pa.field("label", pa.string()),
        pa.field("group", pa.string()),
        pa.field("split", pa.string()),  # the manifest's (validated) split, or null
        pa.field("_row_error", pa.string()),  # JSON quarantine record of a dropped row
        pa.field("_quarantine", pa.string()),  # JSON list of per-modality records
        pa.field("_present", pa.list_(pa.string())),  # modalities that decoded fine
        pa.field("_src", pa.string()),  # JSON {modality: manifest path}
        pa.field("_unknown", pa.list_(pa.string())),  # ignored columns (unknown_columns=warn)
        pa.field("_cleaned", pa.string()),  # JSON {modality: {repair: count}} (decode_noted)
    ]
    for m in pipeline_modalities():
        fields.append(pa.field(f"_hash_{m}", pa.string()))  # exact-duplicate key
        fields.append(pa.field(f"_near_{m}", pa.binary()))  # near-duplicate key
        fields.append(pa.field(f"_caption_{m}", pa.string()))  # caption key
        fields.append(pa.field(m, decoded_type(m)))
        if FEATURIZERS[m].decoded_dtype != "str":
            fields.append(pa.field(f"{m}_shape", pa.list_(pa.int32())))
    return pa.schema(fields)


def decoded_values(batch: pa.Table, m: str) -> list[Any]:
    """Modality ``m``'s stage-1 items of a stage-1 table (``None`` where absent)."""
    dd = FEATURIZERS[m].decoded_dtype
    if dd == "str":
        return batch.column(m).to_pylist()
    return unpack_column(m, batch.column(m), batch.column(f"{m}_shape"), dtype=dd)


def _absent(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _as_str(v: Any) -> str | None:
    if _absent(v):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # CSV/Parquet numbers: "7" rather than "7.0"
    return str(v).strip()


def _suffix(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else None


def record(
    id_: str | None, modality: str | None, path: str | None, reason: str, detail: str = ""
) -> dict[str, Any]:
    """One quarantine record (a line of ``quarantine.jsonl``)."""
    return {"id": id_, "modality": modality, "path": path, "reason": reason, "detail": detail}


class DecodeRows:
    """Stage 1: manifest rows -> decoded modalities, dedupe keys, quarantine records.

    Every modality goes through its featurizer's ``decode`` (the stage-1 form: the final
    featurized item unless the featurizer has a second phase). A value the featurizer
    ``accepts_inline`` is decoded as it is; anything else must be a path, read through the
    :class:`PathResolver` and typed by its suffix (or the featurizer's ``sniff``).

    Args:
        config: The resolved :class:`DataConfig` as a plain dict.
        root: Corpus root (the manifest's folder).
        jsonl: Input batches hold raw JSONL lines in column ``text`` (``read_text``).
        source: Manifest name, for messages.
    """

    def __init__(self, config: dict[str, Any], root: str, jsonl: bool, source: str) -> None:
        from common.config import from_dict

        self.cfg: DataConfig = from_dict(DataConfig, config)
        self.jsonl = jsonl
        self.source = source
        self.resolver = PathResolver(root, self.cfg.extra_roots)
        fc = self.cfg.features
        self.modalities = pipeline_modalities()
        self.known = known_columns()
        self.featurizers: dict[str, Featurizer] = {
            m: get_featurizer(m, fc) for m in self.modalities
        }
        self.near = set(near_modalities(self.cfg.dedupe))

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.jsonl:
            numbers = (
                batch.column("line").to_pylist()
                if "line" in batch.column_names
                else [None] * batch.num_rows
            )
            rows = [
                self._parse_line(line, n)
                for line, n in zip(batch.column("text").to_pylist(), numbers, strict=True)
            ]
        else:
            self._check_columns(batch.column_names)
            rows = batch.to_pylist()
        out = [self._row(r) for r in rows]
        for r, o in zip(rows, out, strict=True):
            o["_unknown"] = sorted(set(r) - self.known - _IGNORED_COLUMNS - {"__error__"})
        return self._to_table(out)

    # -- parsing -----------------------------------------------------------------
    def _parse_line(self, line: str | bytes, number: int | None = None) -> dict[str, Any]:
        """One JSONL line (bytes, or an already decoded string) -> its object, or a row
        error ``parse_error`` naming the line number (invalid UTF-8, malformed JSON,
        numbers too long to parse, not an object)."""
        where = f"line {number}: " if number is not None else ""

        def bad(detail: str) -> dict[str, Any]:
            rec = record(None, None, None, "parse_error", where + detail)
            if number is not None:
                rec["line"] = number
            return {"__error__": rec}

        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                return bad(f"not UTF-8 ({e.reason} at byte {e.start}): {line[:120]!r}")
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            return bad(f"{type(e).__name__}: {str(e)[:200]}: {line[:200]!r}")
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            return bad(f"number out of range ({str(e)[:120]}): {line[:120]!r}")
        if not isinstance(obj, dict):
            return bad(f"not an object: {line[:200]!r}")
        if _SURROGATE_ESCAPE.search(line):
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                return bad("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        self._check_columns(obj.keys(), row_id=obj.get("id"))
        return obj

    def _check_columns(self, columns, row_id: Any = None) -> None:
        unknown = sorted(set(columns) - self.known - _IGNORED_COLUMNS)
        if unknown and self.cfg.unknown_columns == "error":
            where = f" (row id={row_id!r})" if row_id is not None else ""
            raise ManifestError(
                f"{self.source}: unknown column(s) {unknown}{where}; known: {sorted(self.known)}."
                " Rename them, or pass unknown_columns=warn to ignore them."
            )

    # -- one row ----------------------------------------------------------------
    def _row(self, raw: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "_quarantine": [],
            "_present": [],
            "_src": {},
            "_item": {},
            "_cleaned": {},
        }
        if "__error__" in raw:
            out["_row_error"] = raw["__error__"]
            return out
        rid = _as_str(raw.get("id"))
        out.update(id=rid, label=_as_str(raw.get("label")), group=_as_str(raw.get("group")))
        if rid is None:
            src = {
                m: raw[m]
                for m in self.modalities
                if not _absent(raw.get(m)) and not self.featurizers[m].accepts_inline(raw[m])
            }
            out["_row_error"] = record(
                None,
                None,
                None,
                "missing_id",
                f"row without id (files: {json.dumps(src, default=str)[:200]})",
            )
            return out
        split = _as_str(raw.get("split"))
        if split is not None:
            out["split"] = parse_split(split)
            if out["split"] is None:
                out["_row_error"] = record(
                    rid,
                    None,
                    None,
                    "bad_split",
                    f"split {split[:50]!r} is not one of train, val, test"
                    " (leave it empty and prepare assigns one)",
                )
                return out
        for m in self.modalities:
            value = raw.get(m)
            if _absent(value):
                continue
            f = self.featurizers[m]
            inline = f.accepts_inline(value)
            path = value if not inline and isinstance(value, str) else None
            if path is not None:
                out["_src"][m] = path
            try:
                self._modality(m, value, inline, out)
                out["_present"].append(m)
            except SampleError as e:
                out["_quarantine"].append(record(rid, m, path, e.reason, e.detail))
            except Exception as e:  # noqa: BLE001 - a decoder bug must not kill the job
                tb = traceback.format_exc(limit=2).replace("\n", " | ")
                out["_quarantine"].append(
                    record(
                        rid,
                        m,
                        path,
                        "decode_error",
                        f"unexpected {type(e).__name__}: {e} [{tb[-300:]}]",
                    )
                )
        return out

    def _modality(self, m: str, value: Any, inline: bool, out: dict[str, Any]) -> None:
        f = self.featurizers[m]
        data: bytes | None = None
        if inline:
            item, notes = f.decode_noted(value, None)
        else:
            if not isinstance(value, str):
                raise SampleError(
                    "bad_path", f"{m} must be a path string, got {type(value).__name__}"
                )
            data = self.resolver.read(value, self.cfg.features.max_file_bytes)
            item, notes = f.decode_noted(data, _suffix(value) or f.sniff(data))
        out["_item"][m] = item
        if notes:
            out["_cleaned"][m] = notes
        out[f"_hash_{m}"] = f.exact_key(item, data)
        if m in self.near:
            out[f"_near_{m}"] = near_key(f.near_dedupe, item, self.cfg.dedupe, data)
        out[f"_caption_{m}"] = f.caption_key(item)

    def _to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        schema = stage1_schema()
        cols: dict[str, Any] = {
            "id": [r.get("id") for r in rows],
            "label": [r.get("label") for r in rows],
            "group": [r.get("group") for r in rows],
            "split": [r.get("split") for r in rows],
            "_row_error": [
                json.dumps(r["_row_error"]) if r.get("_row_error") else None for r in rows
            ],
            "_quarantine": [
                json.dumps(r["_quarantine"]) if r["_quarantine"] else None for r in rows
            ],
            "_present": [r["_present"] for r in rows],
            "_src": [json.dumps(r["_src"], sort_keys=True) for r in rows],
            "_unknown": [r.get("_unknown") or None for r in rows],
            "_cleaned": [
                json.dumps(r["_cleaned"], sort_keys=True) if r.get("_cleaned") else None
                for r in rows
            ],
        }
        arrays: dict[str, pa.Array] = {}
        for m in self.modalities:
            for k in ("_hash_", "_near_", "_caption_"):
                cols[f"{k}{m}"] = [r.get(f"{k}{m}") for r in rows]
            items = [r["_item"].get(m) for r in rows]
            dd = FEATURIZERS[m].decoded_dtype
            if dd == "str":
                cols[m] = [None if v is None else str(v) for v in items]
            else:
                arrays[m], arrays[f"{m}_shape"] = pack_tensors(m, items, dtype=dd)
        out = [
            arrays[f.name] if f.name in arrays else pa.array(cols[f.name], type=f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(out, names=schema.names).cast(schema)


_DECODERS: dict[str, DecodeRows] = {}


def decode_batch(
    batch: pa.Table, config: dict[str, Any], root: str, jsonl: bool, source: str
) -> pa.Table:
    """Task UDF around :class:`DecodeRows`, one decoder cached per worker process.

    Tasks rather than an actor pool: Ray reuses warm worker processes (imports and the
    cached decoder survive between tasks), and no idle actors keep holding CPUs after
    the stage, which would stall the next stage on a small node. The cache key is the
    full set-up, so a different run never reuses a stale decoder.
    """
    return _decoder(config, root, jsonl, source)(batch)


def decode_block(
    block: pa.Table, batch_size: int, config: dict[str, Any], root: str, jsonl: bool, source: str
) -> pa.Table:
    """Task around :class:`DecodeRows` for one whole read block: its rows in batches of
    ``batch_size`` (what one decode call holds in memory), one stage-1 table back."""
    dec = _decoder(config, root, jsonl, source)
    step = max(1, int(batch_size))
    parts = [dec(block.slice(i, step)) for i in range(0, block.num_rows, step)]
    if len(parts) == 1:
        return parts[0]
    return pa.concat_tables(parts) if parts else dec(block)


def _decoder(config: dict[str, Any], root: str, jsonl: bool, source: str) -> DecodeRows:
    key = json.dumps([config, root, jsonl, source], sort_keys=True, default=str)
    dec = _DECODERS.get(key)
    if dec is None:
        _DECODERS.clear()
        dec = _DECODERS[key] = DecodeRows(config, root, jsonl, source)
    return dec


def warm_decoder(
    config: dict[str, Any],
    root: str,
    jsonl: bool,
    source: str,
    modalities: list[str] | None = None,
) -> None:
    """Task that loads in a worker process what its first decode task would: this module,
    the cached :class:`DecodeRows` and its featurizers' lazy libraries (of ``modalities``
    only, e.g. those the manifest's first rows hold; ``None``: all). A featurizer left
    cold loads its libraries on its first item. (Decode tasks are plain Ray tasks
    (:func:`decode_block`): no Ray Data, and its ~2 s import of pandas & co., here.)"""
    for m, f in _decoder(config, root, jsonl, source).featurizers.items():
        if modalities is None or m in modalities:
            f.warm_up()


class FinalizeRows:
    """Stage 2: applies the driver's plan and finalizes the two-phase modalities.

    Every modality whose featurizer has a second phase (``finalize``/``fit``, e.g. the
    tokenizer of a ``tokenized`` featurizer, fitted statistics) is finalized here, with
    the featurizer built from the resolved config (fitted sections included); the others
    pass through as stage 1 wrote them.

    Args:
        config: Resolved :class:`DataConfig` as a dict.
        plan: ``drop_rows`` (ids), ``drop_index`` (positions of rows dropped although
            their id is kept: the later rows of a repeated id), ``drop_mods``
            ({id: [modality]}), ``group_split`` ({group: split} of rows the manifest gives
            no split), ``num_shards`` ({split: n}).
        tokenizer_json: The tokenizer as a JSON string (no shared filesystem needed), or
            ``None`` when no featurizer is ``tokenized``.
    """

    def __init__(
        self, config: dict[str, Any], plan: dict[str, Any], tokenizer_json: str | None
    ) -> None:
        from common.config import from_dict

        cfg = from_dict(DataConfig, config)
        self.modalities = pipeline_modalities()
        tokenizer = None
        if tokenizer_json is not None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(tokenizer_json)
        self.stage2: dict[str, Featurizer] = {}
        for m in self.modalities:
            cls = FEATURIZERS[m]
            if cls.has_stage2():
                kw = {"tokenizer": tokenizer} if cls.tokenized else {}
                self.stage2[m] = get_featurizer(m, cfg.features, **kw)
        self.drop_rows = set(plan["drop_rows"])
        self.drop_index = set(plan.get("drop_index", ()))
        self.drop_mods = {k: set(v) for k, v in plan["drop_mods"].items()}
        self.group_split = plan["group_split"]
        self.num_shards = plan["num_shards"]

    def __call__(self, batch: pa.Table, offset: int = 0) -> pa.Table:
        """Rows of one stage-1 block -> final rows with ``_split`` and ``_shard``.

        Args:
            batch: A stage-1 block.
            offset: Position of the block's first row among all rows read (manifest order).
        """
        keep = []
        ids = batch.column("id").to_pylist()
        errs = batch.column("_row_error").to_pylist()
        for i, (rid, err) in enumerate(zip(ids, errs, strict=True)):
            if err is None and rid is not None and rid not in self.drop_rows:
                if offset + i not in self.drop_index:
                    keep.append(i)
        if len(keep) < batch.num_rows:  # a take copies every column (pixels included)
            batch = batch.take(pa.array(keep, type=pa.int64()))
        ids = batch.column("id").to_pylist()
        groups = batch.column("group").to_pylist()
        present = batch.column("_present").to_pylist()
        fixed = batch.column("split").to_pylist()
        mods, splits, shards = [], [], []
        for rid, grp, pres, fix in zip(ids, groups, present, fixed, strict=True):
            dropped = self.drop_mods.get(rid, set())
            mods.append([m for m in self.modalities if m in pres and m not in dropped])
            split = fix or self.group_split[grp if grp is not None else rid]
            splits.append(split)
            shards.append(shard_of(rid, self.num_shards[split]))
        arrays: dict[str, pa.Array] = {
            "id": batch.column("id"),
            "label": batch.column("label"),
            "group": batch.column("group"),
            "modalities": pa.array(mods, type=pa.list_(pa.string())),
        }
        for m in self.modalities:
            if m in self.stage2:
                f = self.stage2[m]
                items = decoded_values(batch, m)
                data, shape = pack_tensors(
                    m,
                    [
                        f.finalize(v) if m in have else None
                        for v, have in zip(items, mods, strict=True)
                    ],
                )
            elif all(m in have for have in mods) or not any(m in have for have in mods):
                # Nothing to null out (every row keeps it, or none has it): no copy of
                # the column (224-px pixels are ~150 kB a row).
                have_any = any(m in have for have in mods)
                data = (
                    batch.column(m) if have_any else pa.nulls(len(mods), batch.schema.field(m).type)
                )
                shape = (
                    batch.column(f"{m}_shape")
                    if have_any
                    else pa.nulls(len(mods), pa.list_(pa.int32()))
                )
            else:
                keep_m = pa.array([m in have for have in mods], type=pa.bool_())
                null_data = pa.nulls(len(mods), type=batch.schema.field(m).type)
                null_shape = pa.nulls(len(mods), type=pa.list_(pa.int32()))
                data = pc.if_else(keep_m, batch.column(m), null_data)
                shape = pc.if_else(keep_m, batch.column(f"{m}_shape"), null_shape)
            arrays[m] = data
            arrays[f"{m}_shape"] = shape
        arrays["_split"] = pa.array(splits, type=pa.string())
        arrays["_shard"] = pa.array(shards, type=pa.int32())
        return pa.table(arrays)


def finalize_batch(
    batch: pa.Table,
    config: dict[str, Any],
    plan: Any,
    tokenizer_json: str | None,
    offset: int = 0,
) -> pa.Table:
    """Task UDF around :class:`FinalizeRows` (one block per call).

    Tasks rather than actors, so stage 2 reuses warm workers; set-up (a tokenizer from
    JSON, a few sets) costs milliseconds. ``plan`` is a dict or an object ref to one.
    """
    if not isinstance(plan, dict):
        import ray

        plan = ray.get(plan)
    return FinalizeRows(config, plan, tokenizer_json)(batch, offset)


def finalize_and_route(
    block: pa.Table,
    groups: list[tuple[str, int]],
    config: dict[str, Any],
    plan: dict[str, Any],
    tokenizer_json: str | None,
    offset: int = 0,
) -> tuple[pa.Table, ...] | pa.Table:
    """One stage-1 block (its first row at position ``offset``) through stage 2 in one
    task: :class:`FinalizeRows`, then :func:`route_block` (one table per group)."""
    return route_block(finalize_batch(block, config, plan, tokenizer_json, offset), groups)
