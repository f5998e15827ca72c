"""The ``prepare`` pipeline (Contract 2): manifest -> Parquet shards per split.

Ray Data reads the manifest (any format, any pyarrow filesystem); Ray tasks do the heavy work
in parallel; the driver only sees small per-row keys::

    read manifest (Ray Data, JSONL/CSV/Parquet, any pyarrow filesystem), split by the
      read task itself into blocks of ~rows_per_block rows (the unit of parallelism)
      -> one plain Ray task per block (DecodeRows): resolve + read + decode + validate +
         dedupe keys; outputs stay in the object store (spills to disk: RAM stays bounded)
    driver: keys -> duplicate ids, duplicates, splits, shard counts (pipelines.plan);
      the tokenizer of ``tokenized`` featurizers; ``fit`` of fitted featurizers on the
      TRAIN split's decoded items, merged into the resolved data config
      -> one plain Ray task per block: apply the plan, finalize the two-phase
         modalities (FinalizeRows) and route the rows to their (split, shard); one write
         task per shard: one sorted Parquet file per shard
    driver: quarantine.jsonl, stats.json, data_config.yaml, summary (pipelines.stats)

Use :func:`run_prepare` from Python (Ray must be initialized) or ``python -m jobs.prepare``.
Reading the manifest lives in :mod:`pipelines.manifest`, the driver's decisions in
:mod:`pipelines.plan`, the accounting in :mod:`pipelines.stats`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import ConfigError, save_yaml, to_dict
from pipelines.config import DataConfig
from pipelines.dedupe import exact_modalities, near_modalities
from pipelines.featurize import FEATURIZERS, get_featurizer
from pipelines.manifest import (
    check_columns,
    check_exists,
    estimate_rows,
    head_modalities,
    manifest_format,
    read_manifest,
    unwrap_error,
)
from pipelines.paths import manifest_root
from pipelines.plan import plan_rows, split_groups, train_items
from pipelines.schema import SPLITS
from pipelines.shards import route_block, write_group
from pipelines.stages import (
    ManifestError,
    decode_block,
    decoded_values,
    finalize_and_route,
    key_columns,
    pipeline_modalities,
    warm_decoder,
)
from pipelines.stats import build_stats, format_summary, write_json_lines
from pipelines.tokenizer import (
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    load_tokenizer,
    tokenizer_file,
    train_tokenizer,
)

__all__ = [
    "estimate_rows",
    "fit_featurizers",
    "read_manifest",
    "run_prepare",
    "shuffle_write",
    "split_groups",
]


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
    try:
        exact_modalities(cfg.dedupe), near_modalities(cfg.dedupe)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    manifest = str(manifest)
    if "://" not in manifest:
        manifest = os.path.abspath(manifest)
    out = os.path.abspath(str(out))
    check_exists(manifest)
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
        # Only the featurizers of the modalities in the manifest's first rows load their
        # libraries (open3d, decord, scipy.signal: ~1 s of CPU each, which an image-only
        # job spent while its decode tasks waited for the CPU).
        warm = ray.remote(num_cpus=1)(warm_decoder)
        head = head_modalities(manifest, pipeline_modalities())
        for _ in range(min(conc, ncpu) - 1):
            warm.remote(**decoder_args, modalities=head)

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.execution.progress_bars
    ctx.print_on_execution_start = False

    # ---- stage 1: read + decode + featurize (parallel, streaming) ------------------
    rows = estimate_rows(manifest)
    num_blocks = None if rows is None else max(1, math.ceil(rows / cfg.execution.rows_per_block))
    # Blocks in manifest order: "first row of a repeated id" means the manifest's first,
    # and a row's position (its block's offset + its index) identifies it in stage 2. The
    # dataset keeps a copy of the context it was created with; the global one is restored.
    preserve_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds, jsonl = read_manifest(manifest, cfg, num_blocks)
    finally:
        ctx.execution_options.preserve_order = preserve_order
    if not jsonl:
        # Columnar manifests: check the columns up front (JSONL rows are checked per line).
        try:
            names = ds.schema().names
        except Exception as e:  # noqa: BLE001 - unreadable CSV/Parquet
            inner = unwrap_error(e)
            raise ManifestError(f"cannot read manifest {manifest}: {inner}") from e
        check_columns(names, cfg, manifest)
    if num_blocks is None:
        ds = ds.repartition(target_num_rows_per_block=cfg.execution.rows_per_block)
    # The read (Ray Data: any format and filesystem, split into ~rows_per_block-row blocks
    # by the read task) is materialized (manifest text: small), then one plain Ray task per
    # block decodes it, all submitted at once: Ray queues them and starts the next one on
    # a worker as it frees, with no driver-side executor in between, no one-task-at-a-time
    # start and no Ray Data import in the decode workers. (A Ray Data map operator left
    # 0.2-0.3 s between a worker's blocks on a loaded 2-CPU machine; plain tasks still
    # leave ~0.1-0.3 s there under that load: result put + next dispatch. Measured 4,000
    # rows, load ~19: first decode 5-9 s after the start instead of 12 s.) Outputs stay
    # in the object store, as materialize kept them.
    try:
        read_refs = ds.to_arrow_refs()
    except Exception as e:  # noqa: BLE001 - re-raised with a clear message
        inner = unwrap_error(e)
        if inner is e:
            raise
        raise ManifestError(f"cannot read manifest {manifest}: {inner}") from e
    decode = ray.remote(decode_block).options(
        num_cpus=1,
        memory=cfg.execution.decode_memory_mb * 2**20,
        max_retries=cfg.execution.decode_retries,
    )
    refs: list[Any] = []
    for i, ref in enumerate(read_refs):
        if cfg.execution.concurrency and i >= conc:
            # An explicit bound: task i starts once task i - conc has finished.
            ray.wait([refs[i - conc]], fetch_local=False)
        refs.append(decode.remote(ref, cfg.execution.batch_size, **decoder_args))
    del read_refs
    if refs:
        ray.wait(refs, num_returns=len(refs), fetch_local=False)  # a failure raises below
    t_decode = time.perf_counter() - t0

    # ---- driver: small keys only ------------------------------------------------
    cols = key_columns()
    # Decoded items the driver needs: the strings a tokenizer is trained on, and the
    # (small) items fitted featurizers learn from.
    tokenized = [m for m in pipeline_modalities() if FEATURIZERS[m].tokenized]
    fitted = [m for m in pipeline_modalities() if FEATURIZERS[m].is_fitted(cfg.features.section(m))]
    keys: dict[str, list] = {c: [] for c in cols}
    decoded_items: dict[str, list] = {m: [] for m in dict.fromkeys(tokenized + fitted)}
    # Iterating the materialized blocks needs no new tasks; one block at a time reaches
    # the driver (bounded memory) and only the small key columns are kept. Each block's
    # offset (position of its first row) goes to stage 2 with it.
    offsets: list[int] = []
    for ref in refs:
        b = _get_decoded(ref, manifest)
        offsets.append(len(keys["id"]))
        for c in cols:
            keys[c].extend(b.column(c).to_pylist())
        for m in decoded_items:
            decoded_items[m].extend(decoded_values(b, m))
    t_keys = time.perf_counter() - t0 - t_decode
    plan, quarantine, info = plan_rows(keys, cfg)

    # ---- tokenizer and fitted featurizers ---------------------------------------------
    tokenizer, trained = None, False
    if tokenized:
        tokenizer, trained = _tokenizer(
            cfg, Path(out) / TOKENIZER_DIR, keys["id"], decoded_items, tokenized
        )
    if fitted:
        items = train_items(
            {m: decoded_items[m] for m in fitted}, keys["id"], plan, keys["group"], keys["split"]
        )
        cfg = fit_featurizers(cfg, items)
        cfg_dict = to_dict(cfg)
    del keys, decoded_items
    t_plan = time.perf_counter() - t0 - t_decode - t_keys

    # ---- stage 2: apply plan, finalize, write shards --------------------------------
    written: list[dict[str, Any]] = []
    if plan["kept"]:
        plan_ref = ray.put(
            {
                k: plan[k]
                for k in ("drop_rows", "drop_index", "drop_mods", "group_split", "num_shards")
            }
        )
        written = shuffle_write(
            refs,
            out,
            plan["num_shards"],
            finalize_args=(
                cfg_dict,
                plan_ref,
                None if tokenizer is None else ray.put(tokenizer.to_str()),
            ),
            offsets=offsets,
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
    stats["tokenizer"] = (
        None
        if tokenizer is None
        else {"trained": trained, "vocab_size": tokenizer.get_vocab_size(), "path": "tokenizer/"}
    )
    write_json_lines(Path(out) / "quarantine.jsonl", quarantine)
    with open(Path(out) / "stats.json", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    save_yaml(cfg, Path(out) / "data_config.yaml")
    if not stats["accounting"]["ok"]:
        raise RuntimeError(f"accounting mismatch: {stats['accounting']}")
    if verbose:
        print(format_summary(stats), file=sys.stderr, flush=True)
    return stats


def _get_decoded(ref: Any, manifest: str) -> Any:
    """A decode task's output; its failure (e.g. unknown columns) as a clear ManifestError."""
    import ray

    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - re-raised with a clear message
        inner = unwrap_error(e)
        if inner is e:
            raise
        raise ManifestError(f"cannot process manifest {manifest}: {inner}") from e


def _tokenizer(
    cfg: DataConfig,
    tok_dir: Path,
    ids: list[str | None],
    decoded_items: dict[str, list],
    tokenized: list[str],
) -> tuple[Any, bool]:
    """The corpus tokenizer in ``tok_dir``: copied from ``cfg.tokenizer_path``, or trained
    on the decoded strings of the ``tokenized`` modalities (every split, sorted by id, so
    the same corpus gives the same tokenizer whatever the block order).

    Returns:
        ``(tokenizer, trained)``.
    """
    if cfg.tokenizer_path:
        src = tokenizer_file(cfg.tokenizer_path)
        tok_dir.mkdir(parents=True, exist_ok=True)
        if src.resolve() != (tok_dir / TOKENIZER_FILE).resolve():
            shutil.copyfile(src, tok_dir / TOKENIZER_FILE)
        return load_tokenizer(tok_dir), False
    texts = sorted(
        (i, str(t))
        for m in tokenized
        for i, t in zip(ids, decoded_items[m], strict=True)
        if t and i
    )
    vocab = max(cfg.features.section(m).vocab_size for m in tokenized)
    return train_tokenizer((t for _, t in texts), tok_dir, vocab_size=vocab), True


def fit_featurizers(cfg: DataConfig, items: dict[str, list[Any]]) -> DataConfig:
    """Calls ``fit`` of each modality's featurizer on its TRAIN items and merges the
    returned section updates into a copy of ``cfg`` (what ``data_config.yaml`` records,
    and what stage 2's ``finalize`` and every later consumer use)."""
    updates: dict[str, Any] = {}
    for m, its in items.items():
        got = get_featurizer(m, cfg.features).fit(its)
        if got:
            updates[m] = dict(got)
    if not updates:
        return cfg
    return replace(cfg, features=cfg.features.with_overrides(updates))


def shuffle_write(
    blocks: list[Any],
    out: str,
    num_shards: dict[str, int],
    finalize_args: tuple[Any, Any, Any] | None = None,
    offsets: list[int] | None = None,
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
        offsets: Position of each block's first row among all rows (default: 0 each), for
            the plan's ``drop_index``.

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
        offsets = offsets if offsets is not None else [0] * len(blocks)
        pieces = [
            route.remote(ref, groups, *finalize_args, off)
            for ref, off in zip(blocks, offsets, strict=True)
        ]
    if len(groups) == 1:
        pieces = [[p] for p in pieces]
    done = [write.remote(out, num_shards, *[p[g] for p in pieces]) for g in range(len(groups))]
    return [row for table in ray.get(done) for row in table.to_pylist()]
