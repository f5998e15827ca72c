"""``run_embed``: a manifest or a prepared split -> an embedding directory (Ray Data).

::

    driver: check the export, plan the parts (jobs.embedding.parts), skip finished ones
    Ray Data: parts -> featurize_part tasks (read, decode, featurize, window; quarantine)
                    -> EmbedActor pool (map_batches, class UDF: the model, CPU or GPU)
                    -> driver streams the embedded rows into PartWriter (one file per part)
    driver: stats.json + quarantine.jsonl over all finished parts (exact accounting)

Use :func:`run_embed` from Python (Ray must be initialized) or ``python -m jobs.embed``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.config import ConfigError, to_dict
from jobs.embedding.config import EmbedConfig
from jobs.embedding.output import (
    META_FILE,
    QUARANTINE_FILE,
    STATS_FILE,
    PartWriter,
    collect_stats,
    drop_repeated_ids,
    export_revision,
    prepare_out,
)


def _resolve(export: str | Path, cfg: EmbedConfig) -> tuple[Path, Any, list[str]]:
    """The export's path, model config and the modalities to embed (checked)."""
    from jobs.exports import MODEL_CONFIG_FILE, ExportError, check_export, load_featurizers
    from models import OmniConfig

    d = check_export(export)
    try:
        model_cfg = OmniConfig.from_yaml(d / MODEL_CONFIG_FILE)
    except (ConfigError, OSError, ValueError, TypeError) as e:
        raise ExportError(f"unreadable {d / MODEL_CONFIG_FILE}: {e}") from e
    branches = list(model_cfg.modalities)
    mods = list(cfg.modalities) if cfg.modalities is not None else branches
    missing = [m for m in mods if m not in branches]
    if missing or not mods:
        raise ConfigError(
            f"modalities {missing or mods} cannot be embedded: the export's model has "
            f"branches {branches}"
        )
    _, feats = load_featurizers(d, model_cfg, mods)
    for m in cfg.windows:
        if m not in feats or not feats[m].windowed:
            windowed = sorted(k for k, f in feats.items() if f.windowed)
            raise ConfigError(
                f"windows.{m}: {m} is not an embedded modality that can be windowed "
                f"(windowed here: {windowed})"
            )
    return d, model_cfg, mods


def _check_split(data: str, export: Path) -> None:
    """A prepared split must have been featurized as the export featurizes (same features
    and tokenizer): token ids of another tokenizer would embed to garbage silently."""
    from jobs.exports import DATA_CONFIG_FILE
    from pipelines.config import load_feature_config
    from pipelines.stages import ManifestError
    from pipelines.tokenizer import TOKENIZER_DIR, TOKENIZER_FILE

    split = Path(data)
    if not split.is_dir():
        raise ManifestError(f"prepared split not found: {split}")
    root = split.parent
    cfg_path = root / DATA_CONFIG_FILE
    if not cfg_path.is_file():
        raise ManifestError(
            f"{cfg_path} not found: --data takes a split of `python -m jobs.prepare` (SHARDS/SPLIT)"
        )
    ours = to_dict(load_feature_config(cfg_path))
    theirs = to_dict(load_feature_config(export / DATA_CONFIG_FILE))
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ManifestError(
            f"{split} was featurized with other features than the export ({diff} differ in "
            f"{cfg_path}): embed the manifest instead (--manifest)"
        )
    tok_a, tok_b = root / TOKENIZER_DIR / TOKENIZER_FILE, export / TOKENIZER_DIR / TOKENIZER_FILE
    if tok_b.is_file() and (not tok_a.is_file() or tok_a.read_bytes() != tok_b.read_bytes()):
        raise ManifestError(
            f"{split}: its tokenizer ({tok_a}) is not the export's ({tok_b}): embed the "
            "manifest instead (--manifest)"
        )


def run_embed(
    export: str | Path,
    out: str | Path,
    *,
    manifest: str | None = None,
    data: str | None = None,
    config: EmbedConfig | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Embeds a manifest (Contract 1) or a prepared split (Contract 2) with an export.

    Args:
        export: Export directory (Contract 3).
        out: Embedding directory (local; created, or resumed).
        manifest: Manifest path or URI (JSONL, CSV or Parquet).
        data: A prepared split directory ``SHARDS/SPLIT``.
        config: :class:`EmbedConfig`.
        overwrite: Re-embed everything even if ``out`` holds another revision's output.
        verbose: Print the summary line.

    Returns:
        The ``stats.json`` content.

    Raises:
        ConfigError: bad settings. ExportError: a bad export. ManifestError: a missing or
        unreadable input. EmbeddingDirError: ``out`` holds another revision's or settings'
        output and ``overwrite`` is False.
    """
    import ray
    import ray.data

    from jobs.embedding.parts import plan_manifest, plan_split
    from jobs.embedding.stages import EmbedActor, featurize_part
    from pipelines.manifest import check_exists, manifest_format, unwrap_error
    from pipelines.paths import manifest_root
    from pipelines.stages import ManifestError

    t0 = time.perf_counter()
    cfg = config or EmbedConfig()
    if (manifest is None) == (data is None):
        raise ConfigError("give exactly one input: --manifest M or --data SHARDS/SPLIT")
    d, model_cfg, mods = _resolve(export, cfg)
    if manifest is not None:
        source = manifest if "://" in manifest else os.path.abspath(manifest)
        check_exists(source)
        fmt = manifest_format(source)
    else:
        source = os.path.abspath(data)
        _check_split(source, d)
        fmt = "shard"
        if cfg.windows:
            raise ConfigError(
                "windows apply to a manifest's raw media; a prepared split is featurized "
                "already (embed its manifest to window long media)"
            )
    out = os.path.abspath(str(out))
    revision = export_revision(d)
    settings = {
        "source": source,
        "modalities": mods,
        "windows": {m: to_dict(w) for m, w in sorted(cfg.windows.items())},
        "rows_per_part": cfg.rows_per_part if fmt in ("jsonl", "csv") else None,
        "fuse": cfg.fuse,
    }
    meta = {
        "revision": revision,
        "export": str(d),
        "embed_dim": int(model_cfg.embed_dim),
        "modalities": mods,
        "settings": settings,
    }
    done = prepare_out(out, meta, overwrite=overwrite)
    parts = plan_split(source) if fmt == "shard" else plan_manifest(source, cfg.rows_per_part)
    todo = [p for p in parts if p.index not in done]
    t_plan = time.perf_counter() - t0

    ncpu = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ngpu = int(ray.cluster_resources().get("GPU", 0))
    if cfg.gpus_per_actor > 0 and ngpu == 0:
        raise ConfigError("gpus_per_actor > 0 but the Ray cluster has no GPU")
    if cfg.actors:
        actors = cfg.actors
    elif cfg.gpus_per_actor > 0:
        actors = max(1, int(ngpu / cfg.gpus_per_actor))
    else:  # half the CPUs embed, half featurize
        actors = max(1, int((ncpu / 2) / max(cfg.cpus_per_actor, 1e-3)))
    ctx_args = {
        "export": str(d),
        "modalities": mods,
        "windows": settings["windows"],
        "root": manifest_root(source) if manifest is not None else source,
        "jsonl": fmt == "jsonl",
        "source": source,
        "fuse": cfg.fuse,
        "extra_roots": list(cfg.extra_roots),
        "unknown_columns": cfg.unknown_columns,
    }
    writer = PartWriter(out)
    if todo:
        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = cfg.progress_bars
        dctx.print_on_execution_start = False
        ds = ray.data.from_items([p.to_row() for p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            featurize_part,
            fn_kwargs={"ctx": ctx_args},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=cfg.featurize_tasks or ncpu),
            num_cpus=cfg.featurize_cpus,
        )
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "export": str(d),
                "modalities": mods,
                "fuse": cfg.fuse,
                "device": "cuda" if cfg.gpus_per_actor > 0 else "cpu",
                "batch_size": cfg.batch_size,
                "torch_threads": cfg.torch_threads,
            },
            # A whole part per call: the actor groups its segments by modality (and fused
            # rows by modality set) and runs the model on chunks of cfg.batch_size. Batches
            # of cfg.batch_size mixed rows split into sub-batches of a few items each, which
            # made the actor 1.7x slower per part (250 demo rows: 3.94 s vs 2.33 s).
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor or None,
        )
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                writer.add(batch)
        except Exception as e:  # noqa: BLE001 - a manifest error inside a task: one line
            inner = unwrap_error(e)
            if inner is e:
                raise
            raise ManifestError(f"cannot process {source}: {inner}") from e
        writer.close()
    wall = time.perf_counter() - t0

    drop_repeated_ids(out)
    stats, quarantine = collect_stats(out)
    stats.update(
        revision=revision,
        export=str(d),
        embed_dim=int(model_cfg.embed_dim),
        source=source,
        modalities=mods,
        parts={
            "total": len(parts),
            "skipped_finished": len(parts) - len(todo),
            "written": len(writer.written),
        },
        actors=actors,
        wall_s=round(wall, 3),
        plan_s=round(t_plan, 3),
        rows_this_run=writer.rows_read,
        rows_per_s=round(writer.rows_read / wall, 1) if wall > 0 else 0.0,
    )
    with open(Path(out) / QUARANTINE_FILE, "w") as f:
        for q in quarantine:
            f.write(json.dumps(q, sort_keys=True) + "\n")
    tmp = Path(out) / (STATS_FILE + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=True))
    os.replace(tmp, Path(out) / STATS_FILE)
    if not stats["accounting"]["ok"]:
        raise RuntimeError(f"accounting mismatch: {stats['accounting']}")
    if verbose:
        print(format_summary(stats), file=sys.stderr, flush=True)
    return stats


def format_summary(stats: dict[str, Any]) -> str:
    segs = ", ".join(f"{m} {n}" for m, n in sorted(stats["segments"].items()))
    q = stats["quarantined"]
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(q["by_reason"].items())) or "none"
    p = stats["parts"]
    return (
        f"jobs.embed: {stats['rows_read']} rows read, {stats['rows_embedded']} embedded, "
        f"{stats['rows_dropped']} dropped; segments: {segs or 'none'}; fused rows "
        f"{stats['fused_rows']}; quarantined {q['total']} ({reasons}); parts {p['written']} "
        f"written, {p['skipped_finished']} already finished; revision {stats['revision']}; "
        f"{stats['wall_s']} s"
    )


__all__ = ["META_FILE", "format_summary", "run_embed"]
