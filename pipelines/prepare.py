"""The ``prepare`` pipeline (Contract 2): manifest -> Parquet shards per split.

Ray Data does the heavy work in parallel; the driver only sees small per-row keys::

    read manifest (Ray Data, JSONL/CSV/Parquet, any pyarrow filesystem), split by the
      read task itself into blocks of ~rows_per_block rows (the unit of parallelism)
      -> DecodeRows tasks: resolve + read + decode + validate + featurize + dedupe keys
      -> materialize (object store, spills to disk: RAM stays bounded)
    driver: keys -> duplicate ids, duplicates, splits, shard counts; tokenizer training
      -> one plain Ray task per block: apply the plan, tokenize text (FinalizeRows) and
         route the rows to their (split, shard); one write task per shard: one sorted
         Parquet file per shard
    driver: quarantine.jsonl, stats.json, data_config.yaml, summary

Use :func:`run_prepare` from Python (Ray must be initialized) or ``python -m jobs.prepare``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from common.config import save_yaml, to_dict
from pipelines.config import DataConfig
from pipelines.dedupe import find_duplicates, normalize_text_key
from pipelines.paths import manifest_root
from pipelines.schema import MODALITIES, SPLITS
from pipelines.stages import (
    KNOWN_COLUMNS,
    ManifestError,
    decode_batch,
    finalize_and_route,
    record,
    route_block,
    warm_decoder,
    write_group,
)
from pipelines.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_file, train_tokenizer

_KEY_COLUMNS = [
    "id",
    "group",
    "_row_error",
    "_quarantine",
    "_present",
    "_src",
    "_unknown",
    "_text_clean",
    "_phash",
    "_minhash",
] + [f"_hash_{m}" for m in MODALITIES]


def manifest_format(manifest: str) -> str:
    """``jsonl``, ``csv`` or ``parquet`` from the manifest's suffix."""
    name = manifest.lower().rstrip("/")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".parquet", ".pq")) or not os.path.splitext(name)[1]:
        return "parquet"
    raise ManifestError(f"{manifest}: unknown manifest format (use .jsonl, .csv or .parquet)")


def _check_exists(manifest: str) -> None:
    fs, path = _filesystem(manifest)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"manifest not found: {manifest}")


def _filesystem(manifest: str) -> tuple[pafs.FileSystem, str]:
    if "://" in manifest:
        return pafs.FileSystem.from_uri(manifest)
    return pafs.LocalFileSystem(), os.path.abspath(manifest)


#: Bytes of a text manifest the driver reads to estimate its bytes per row.
_PEEK_BYTES = 64 * 1024


def estimate_rows(manifest: str) -> int | None:
    """Rows of a manifest, estimated without reading it (``None``: unknown).

    Text formats: the file size over the mean line length of its first 64 KiB (exact
    for small files); Parquet: the row counts in the footers. Used only to size the
    read's blocks, so an estimate off by a factor changes block sizes, nothing else.
    """
    try:
        fs, path = _filesystem(manifest)
        if manifest_format(manifest) == "parquet":
            import pyarrow.dataset as pads

            return int(pads.dataset(path, format="parquet", filesystem=fs).count_rows())
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File or not info.size:
            return None
        with fs.open_input_stream(path) as f:
            head = f.read(min(info.size, _PEEK_BYTES))
        lines = head.count(b"\n") + (not head.endswith(b"\n"))
        return max(1, round(info.size * lines / max(1, len(head))))
    except (OSError, pa.ArrowException):
        return None


def read_manifest(manifest: str, config: DataConfig, num_blocks: int | None = None):
    """The manifest as a Ray dataset (files are read by Ray Data tasks, not the driver).

    ``num_blocks`` (``override_num_blocks``): the read task itself splits what it reads
    into that many blocks, so no separate repartition step (with its own tasks and
    scheduling rounds) stands between the read and the first decode task.
    """
    import pyarrow.csv as pacsv
    import ray.data

    fmt = manifest_format(manifest)
    if fmt == "jsonl":
        # One line per row, parsed in DecodeRows: a malformed line is quarantined as
        # ``parse_error`` instead of failing the whole file.
        return (
            ray.data.read_text(manifest, drop_empty_lines=True, override_num_blocks=num_blocks),
            True,
        )
    if fmt == "csv":
        delim = "\t" if manifest.lower().endswith(".tsv") else ","
        # Every known column as string: ids like "000123" must keep their zeros.
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in KNOWN_COLUMNS}, strings_can_be_null=True
        )
        return (
            ray.data.read_csv(
                manifest,
                parse_options=pacsv.ParseOptions(delimiter=delim),
                convert_options=convert,
                override_num_blocks=num_blocks,
            ),
            False,
        )
    return ray.data.read_parquet(manifest, override_num_blocks=num_blocks), False


def split_groups(group_rows: dict[str, int], config: DataConfig) -> dict[str, str]:
    """Assigns every group to a split, deterministically.

    Groups are ordered by a salted hash of their name; val and then test take groups
    in that order until they hold their share of rows (at least one group each when
    there are >= 3 groups and the ratio is > 0), train takes the rest.

    Args:
        group_rows: ``{group: kept rows}``.
        config: Data config (``split`` section).

    Returns:
        ``{group: "train" | "val" | "test"}``.
    """
    s = config.split
    order = sorted(
        group_rows,
        key=lambda g: hashlib.blake2b(f"{s.salt}\0{g}".encode(), digest_size=8).digest(),
    )
    total = sum(group_rows.values())
    out: dict[str, str] = {}
    i = 0
    for split, ratio in (("val", s.val), ("test", s.test)):
        target = ratio * total
        taken = 0
        first = True
        while i < len(order) and ratio > 0:
            need_one = first and len(order) >= 3
            if not need_one and taken + group_rows[order[i]] / 2 > target:
                break
            out[order[i]] = split
            taken += group_rows[order[i]]
            i += 1
            first = False
    for g in order[i:]:
        out[g] = "train"
    return out


def _clean_outputs(out: str) -> None:
    # Re-runs must not leave stale shards of a previous, larger run behind.
    for split in SPLITS:
        d = Path(out) / split
        if d.is_dir():
            for f in d.glob("*.parquet"):
                f.unlink()
    for name in ("quarantine.jsonl", "stats.json"):
        p = Path(out) / name
        if p.exists():
            p.unlink()


def _unwrap_error(e: BaseException) -> BaseException:
    """The ManifestError / Arrow error inside a Ray task failure, if any."""
    cause: BaseException | None = e
    for _ in range(6):
        if cause is None:
            break
        if isinstance(cause, ManifestError | pa.ArrowInvalid):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(e)
    for marker in ("ManifestError: ", "ArrowInvalid: ", "JSONDecodeError: "):
        if marker in text:
            return ManifestError(text.split(marker, 1)[1].strip().splitlines()[0][:2000])
    return e


def check_columns(names: list[str], config: DataConfig, manifest: str) -> list[str]:
    """Unknown manifest columns: raises in ``error`` mode, returns them in ``warn`` mode."""
    unknown = sorted(set(names) - KNOWN_COLUMNS)
    if unknown and config.unknown_columns == "error":
        raise ManifestError(
            f"{manifest}: unknown column(s) {unknown}; known: {sorted(KNOWN_COLUMNS)}."
            " Rename them, or pass unknown_columns=warn to ignore them."
        )
    return unknown


def run_prepare(
    manifest: str | Path,
    out: str | Path,
    config: DataConfig | None = None,
    *,
    verbose: bool = True,
) -> dict[str, Any]:
    """Runs the whole pipeline; Ray must already be initialized.

    Args:
        manifest: Manifest path or URI (JSONL, CSV or Parquet).
        out: Output directory (local).
        config: Data config (defaults: :class:`DataConfig`).
        verbose: Print the summary.

    Returns:
        The ``stats.json`` content.

    Raises:
        ManifestError: Missing/unreadable manifest, unknown columns (``error`` mode).
    """
    import ray

    t0 = time.perf_counter()
    cfg = config or DataConfig()
    manifest = str(manifest)
    if "://" not in manifest:
        manifest = os.path.abspath(manifest)
    out = os.path.abspath(str(out))
    _check_exists(manifest)
    os.makedirs(out, exist_ok=True)
    _clean_outputs(out)

    ncpu = max(1, int(ray.cluster_resources().get("CPU", 1)))
    conc = cfg.execution.concurrency or ncpu
    cfg_dict = to_dict(cfg)
    decoder_args = {
        "config": cfg_dict,
        "root": manifest_root(manifest),
        "jsonl": manifest_format(manifest) == "jsonl",
        "source": manifest,
    }
    if cfg.execution.warm_workers:
        # Fire and forget; one CPU stays free for the read and the first decode task.
        # Measured at 2,000 rows on 2 CPUs: 13.5 s vs 14.7 s (3 alternating pairs).
        warm = ray.remote(num_cpus=1)(warm_decoder)
        for _ in range(min(conc, ncpu) - 1):
            warm.remote(**decoder_args)

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.execution.progress_bars
    ctx.print_on_execution_start = False

    # ---- stage 1: read + decode + featurize (parallel, streaming) ------------------
    rows = estimate_rows(manifest)
    num_blocks = None if rows is None else max(1, math.ceil(rows / cfg.execution.rows_per_block))
    ds, jsonl = read_manifest(manifest, cfg, num_blocks)
    if not jsonl:
        # Columnar manifests: check the columns up front (JSONL rows are checked per line).
        try:
            names = ds.schema().names
        except Exception as e:  # noqa: BLE001 - unreadable CSV/Parquet
            inner = _unwrap_error(e)
            raise ManifestError(f"cannot read manifest {manifest}: {inner}") from e
        check_columns(names, cfg, manifest)
    if num_blocks is None:
        ds = ds.repartition(target_num_rows_per_block=cfg.execution.rows_per_block)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs=decoder_args,
        batch_size=cfg.execution.batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=conc),
        num_cpus=1,
        memory=cfg.execution.decode_memory_mb * 2**20,
    )
    try:
        decoded = ds.materialize()
    except Exception as e:  # noqa: BLE001 - re-raised with a clear message
        inner = _unwrap_error(e)
        if inner is e:
            raise
        raise ManifestError(f"cannot process manifest {manifest}: {inner}") from e
    t_decode = time.perf_counter() - t0

    # ---- driver: small keys only ------------------------------------------------
    keys: dict[str, list] = {c: [] for c in _KEY_COLUMNS}
    # Iterating the materialized blocks needs no new tasks; one block at a time reaches
    # the driver (bounded memory) and only the small key columns are kept.
    for b in decoded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        for c in _KEY_COLUMNS:
            keys[c].extend(b.column(c).to_pylist())
    t_keys = time.perf_counter() - t0 - t_decode
    plan, quarantine, info = plan_rows(keys, cfg)

    # ---- tokenizer ------------------------------------------------------------------
    tok_dir = Path(out) / "tokenizer"
    if cfg.tokenizer_path:
        src = tokenizer_file(cfg.tokenizer_path)
        tok_dir.mkdir(parents=True, exist_ok=True)
        if src.resolve() != (tok_dir / TOKENIZER_FILE).resolve():
            shutil.copyfile(src, tok_dir / TOKENIZER_FILE)
        tokenizer = load_tokenizer(tok_dir)
        trained = False
    else:
        # Sorted by id: the same corpus gives the same tokenizer whatever the block order.
        texts = sorted(
            (i, t) for i, t in zip(keys["id"], keys["_text_clean"], strict=True) if t and i
        )
        tokenizer = train_tokenizer(
            (t for _, t in texts), tok_dir, vocab_size=cfg.features.text.vocab_size
        )
        trained = True
    del keys
    t_plan = time.perf_counter() - t0 - t_decode - t_keys

    # ---- stage 2: apply plan, tokenize, write shards --------------------------------
    written: list[dict[str, Any]] = []
    if plan["kept"]:
        plan_ref = ray.put(
            {k: plan[k] for k in ("drop_rows", "drop_mods", "group_split", "num_shards")}
        )
        written = shuffle_write(
            decoded.to_arrow_refs(),
            out,
            plan["num_shards"],
            finalize_args=(cfg_dict, plan_ref, ray.put(tokenizer.to_str())),
        )
    for split in SPLITS:
        (Path(out) / split).mkdir(exist_ok=True)
    wall = time.perf_counter() - t0

    stats = build_stats(manifest, out, cfg, plan, quarantine, info, written, wall, t_decode)
    stats["stage_seconds"] = {
        "decode": round(t_decode, 3),
        "keys": round(t_keys, 3),
        "plan_and_tokenizer": round(t_plan, 3),
        "finalize_and_write": round(wall - t_decode - t_keys - t_plan, 3),
    }
    stats["tokenizer"] = {
        "trained": trained,
        "vocab_size": tokenizer.get_vocab_size(),
        "path": "tokenizer/",
    }
    write_json_lines(Path(out) / "quarantine.jsonl", quarantine)
    with open(Path(out) / "stats.json", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    save_yaml(cfg, Path(out) / "data_config.yaml")
    if not stats["accounting"]["ok"]:
        raise RuntimeError(f"accounting mismatch: {stats['accounting']}")
    if verbose:
        print(format_summary(stats), file=sys.stderr, flush=True)
    return stats


def shuffle_write(
    blocks: list[Any],
    out: str,
    num_shards: dict[str, int],
    finalize_args: tuple[Any, Any, Any] | None = None,
) -> list[dict[str, Any]]:
    """Writes each ``(split, shard)`` group of the blocks' rows as one shard file.

    A two-step exchange of plain Ray tasks: one task per block applies the plan
    (:func:`~pipelines.stages.finalize_and_route` with ``finalize_args`` =
    ``(config, plan, tokenizer_json)``; without them the blocks are final already) and
    routes its rows to the groups (one object per group), then one task per group
    concatenates its pieces and writes them (:func:`write_shard`: sorted by id, so the
    bytes do not depend on the block order). Only object refs pass through the driver;
    pieces live in the object store (which spills to disk), and a write task holds one
    shard.

    Plain tasks rather than Ray Data here: Ray Data's hash-shuffle ``groupby`` started
    aggregator actors (~7 s on a 2-CPU node), and every Ray Data execution starts with
    one task at a time until its first resource reservation arrives (~1 s), which at
    this stage's size was longer than the work (2,000 rows: 16 tasks of ~50 ms ran one
    after the other). The stage's input is already materialized, so it needs no
    streaming.

    Args:
        blocks: Object refs of Arrow tables (stage-1 output, or final rows).
        out: Output root.
        num_shards: ``{split: n}``.
        finalize_args: ``(config dict, plan, tokenizer JSON)``, values or object refs.

    Returns:
        One ``{split, shard, rows, file}`` record per written shard.
    """
    import ray

    groups = [(s, i) for s in SPLITS for i in range(num_shards.get(s, 0))]
    if not groups:
        return []
    write = ray.remote(num_cpus=1)(write_group)
    if finalize_args is None:
        route = ray.remote(num_cpus=1)(route_block).options(num_returns=len(groups))
        pieces = [route.remote(ref, groups) for ref in blocks]
    else:
        route = ray.remote(num_cpus=1)(finalize_and_route).options(num_returns=len(groups))
        pieces = [route.remote(ref, groups, *finalize_args) for ref in blocks]
    if len(groups) == 1:
        pieces = [[p] for p in pieces]
    done = [write.remote(out, num_shards, *[p[g] for p in pieces]) for g in range(len(groups))]
    return [row for table in ray.get(done) for row in table.to_pylist()]


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def plan_rows(
    keys: dict[str, list], cfg: DataConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Driver-side decisions from per-row keys: drops, duplicates, splits, shards.

    Returns:
        ``(plan, quarantine records sorted, info)``; ``plan`` holds ``drop_rows``,
        ``drop_mods``, ``group_split``, ``num_shards``, ``kept``, ``split_rows``.
    """
    n = len(keys["id"])
    quarantine: list[dict[str, Any]] = []
    ignored = sorted({c for u in keys["_unknown"] if u for c in u})
    for q in keys["_quarantine"]:
        if q:
            quarantine.extend(json.loads(q))
    row_ok = [keys["_row_error"][i] is None for i in range(n)]
    for i in range(n):
        if not row_ok[i]:
            quarantine.append(json.loads(keys["_row_error"][i]))

    # Duplicate ids are ambiguous (which row is meant?): every such row is refused.
    id_count = Counter(keys["id"][i] for i in range(n) if row_ok[i])
    dup_ids = {k for k, c in id_count.items() if c > 1}
    for i in range(n):
        if row_ok[i] and keys["id"][i] in dup_ids:
            row_ok[i] = False
            quarantine.append(
                record(
                    keys["id"][i],
                    None,
                    None,
                    "duplicate_id",
                    f"id appears {id_count[keys['id'][i]]} times",
                )
            )

    valid = [i for i in range(n) if row_ok[i]]
    ids = keys["id"]
    present = {i: set(keys["_present"][i] or ()) for i in valid}
    srcs = {i: json.loads(keys["_src"][i]) for i in valid}
    dropped_mods: dict[int, dict[str, str]] = defaultdict(dict)  # row -> {m: survivor id}
    dup_kinds: Counter = Counter()
    d = cfg.dedupe
    for m in MODALITIES:
        items = [i for i in valid if m in present[i]]
        if not items:
            continue
        use_exact = m in d.exact
        use_phash = m == "image" and d.near_image
        use_minhash = m == "text" and d.near_text
        if not (use_exact or use_phash or use_minhash):
            continue
        dups = find_duplicates(
            [ids[i] for i in items],
            exact=[keys[f"_hash_{m}"][i] for i in items] if use_exact else None,
            phash=[keys["_phash"][i] for i in items] if use_phash else None,
            hamming=d.image_hamming,
            minhash=[keys["_minhash"][i] for i in items] if use_minhash else None,
            jaccard=d.text_jaccard,
            bands=d.text_bands,
        )
        for k, (s, kind) in dups.items():
            row, surv = items[k], ids[items[s]]
            dropped_mods[row][m] = surv
            dup_kinds[(m, kind)] += 1
            quarantine.append(
                record(ids[row], m, srcs[row].get(m), f"duplicate_of:{surv}", f"{kind} duplicate")
            )
    if d.drop_text_of_duplicate_rows:
        index_of = {ids[i]: i for i in valid}
        for row, mods in dropped_mods.items():
            others = present[row] - {"text"}
            if "text" not in present[row] or "text" in mods or not others or set(mods) < others:
                continue
            survivors = {mods[m] for m in others}
            if len(survivors) != 1:
                continue
            surv = survivors.pop()
            s_text = keys["_text_clean"][index_of[surv]]
            r_text = keys["_text_clean"][row]
            if s_text is None or normalize_text_key(s_text) != normalize_text_key(r_text):
                continue  # a new caption of duplicated content is new information
            mods["text"] = surv
            dup_kinds[("text", "row")] += 1
            quarantine.append(
                record(
                    ids[row],
                    "text",
                    srcs[row].get("text"),
                    f"duplicate_of:{surv}",
                    "caption of a duplicate row",
                )
            )

    drop_rows: set[str] = set(dup_ids)
    kept_mods: dict[int, list[str]] = {}
    for i in valid:
        have = [m for m in MODALITIES if m in present[i] and m not in dropped_mods.get(i, {})]
        if have:
            kept_mods[i] = have
        else:
            drop_rows.add(ids[i])
            quarantine.append(
                record(
                    ids[i],
                    None,
                    None,
                    "no_valid_modality",
                    "every modality was refused or a duplicate",
                )
            )

    group_rows: Counter = Counter()
    for i in kept_mods:
        group_rows[keys["group"][i] or ids[i]] += 1
    group_split = split_groups(dict(group_rows), cfg)
    split_rows = Counter()
    for g, c in group_rows.items():
        split_rows[group_split[g]] += c
    num_shards = {
        s: (math.ceil(split_rows[s] / cfg.rows_per_shard) if split_rows[s] else 0) for s in SPLITS
    }

    combos: dict[str, Counter] = defaultdict(Counter)
    pairs: dict[str, Counter] = defaultdict(Counter)
    per_mod: dict[str, Counter] = defaultdict(Counter)
    for i, have in kept_mods.items():
        split = group_split[keys["group"][i] or ids[i]]
        combos["+".join(have)][split] += 1
        for a, b in itertools.combinations(have, 2):
            pairs[f"{a}-{b}"][split] += 1
        for m in have:
            per_mod[m][split] += 1
    quarantine.sort(key=lambda r: (r["id"] or "", r["modality"] or "", r["reason"], r["detail"]))
    plan = {
        "drop_rows": sorted(drop_rows),
        "drop_mods": {
            ids[i]: sorted(m) for i, m in dropped_mods.items() if ids[i] not in drop_rows
        },
        "group_split": group_split,
        "num_shards": num_shards,
        "kept": len(kept_mods),
        "split_rows": dict(split_rows),
    }
    info = {
        "rows_read": n,
        "rows_dropped": n - len(kept_mods),
        "ignored_columns": ignored,
        "duplicates": {f"{m}/{k}": c for (m, k), c in sorted(dup_kinds.items())},
        "combinations": {k: _with_total(v) for k, v in sorted(combos.items())},
        "pairs": {k: _with_total(v) for k, v in sorted(pairs.items())},
        "modalities": {m: _with_total(per_mod[m]) for m in MODALITIES},
        "groups": {s: sorted(g for g, sp in group_split.items() if sp == s) for s in SPLITS},
    }
    return plan, quarantine, info


def _with_total(c: Counter) -> dict[str, int]:
    out = {s: int(c.get(s, 0)) for s in SPLITS}
    out["total"] = sum(out.values())
    return out


def build_stats(
    manifest: str,
    out: str,
    cfg: DataConfig,
    plan: dict[str, Any],
    quarantine: list[dict[str, Any]],
    info: dict[str, Any],
    written: list[dict[str, Any]],
    wall: float,
    t_decode: float,
) -> dict[str, Any]:
    """The ``stats.json`` content (see DESIGN Contract 2)."""
    rows_written = {s: 0 for s in SPLITS}
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    for w in written:
        rows_written[w["split"]] += int(w["rows"])
        files[w["split"]].append(w["file"])
    total_written = sum(rows_written.values())
    by_reason: Counter = Counter()
    by_mod: dict[str, Counter] = defaultdict(Counter)
    dropped_by_reason: Counter = Counter()
    for r in quarantine:
        reason = "duplicate" if r["reason"].startswith("duplicate_of:") else r["reason"]
        by_reason[reason] += 1
        by_mod[r["modality"] or "row"][reason] += 1
        if r["modality"] is None:
            dropped_by_reason[r["reason"]] += 1
    read = info["rows_read"]
    dropped = info["rows_dropped"]
    ok = (
        total_written + dropped == read
        and total_written == plan["kept"]
        and sum(dropped_by_reason.values()) == dropped
        and all(rows_written[s] == plan["split_rows"].get(s, 0) for s in SPLITS)
    )
    return {
        "manifest": manifest,
        "out": out,
        "config_name": cfg.name,
        "rows_read": read,
        "rows_written": {**rows_written, "total": total_written},
        "rows_dropped": dropped,
        "rows_dropped_by_reason": dict(sorted(dropped_by_reason.items())),
        "quarantined": {
            "records": len(quarantine),
            "by_reason": dict(sorted(by_reason.items())),
            "by_modality": {m: dict(sorted(c.items())) for m, c in sorted(by_mod.items())},
        },
        "duplicates": info["duplicates"],
        "modalities": info["modalities"],
        "combinations": info["combinations"],
        "pairs": info["pairs"],
        "splits": {
            s: {
                "rows": rows_written[s],
                "groups": len(info["groups"][s]),
                "files": sorted(files[s]),
            }
            for s in SPLITS
        },
        "ignored_columns": info["ignored_columns"],
        "accounting": {
            "read": read,
            "written": total_written,
            "dropped": dropped,
            "ok": ok,
        },
        "wall_seconds": round(wall, 3),
        "decode_seconds": round(t_decode, 3),
        "throughput_rows_per_s": round(read / wall, 2) if wall > 0 else None,
    }


def format_summary(stats: dict[str, Any]) -> str:
    """A one-screen human summary of a run."""
    w = stats["rows_written"]
    lines = [
        "=" * 72,
        f"prepare: {stats['manifest']} -> {stats['out']}",
        f"rows read {stats['rows_read']}  written {w['total']} "
        f"(train {w['train']}, val {w['val']}, test {w['test']})  dropped {stats['rows_dropped']}"
        f"  accounting {'OK' if stats['accounting']['ok'] else 'MISMATCH'}",
        f"time {stats['wall_seconds']:.1f}s  ({stats['throughput_rows_per_s']} rows/s)",
        "quarantined by reason: "
        + (", ".join(f"{k}={v}" for k, v in stats["quarantined"]["by_reason"].items()) or "none"),
    ]
    for m, c in stats["quarantined"]["by_modality"].items():
        lines.append(f"  {m:<11} " + ", ".join(f"{k}={v}" for k, v in c.items()))
    if stats["duplicates"]:
        lines.append("duplicates: " + ", ".join(f"{k}={v}" for k, v in stats["duplicates"].items()))
    lines.append(
        "kept per modality: "
        + ", ".join(f"{m}={c['total']}" for m, c in stats["modalities"].items())
    )
    top = sorted(stats["pairs"].items(), key=lambda kv: -kv[1]["total"])
    lines.append("pairs: " + ", ".join(f"{k}={v['total']}" for k, v in top))
    if stats["ignored_columns"]:
        lines.append(f"ignored columns: {stats['ignored_columns']}")
    lines.append("=" * 72)
    return "\n".join(lines)
