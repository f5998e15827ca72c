"""Accounting of a ``prepare`` run: ``stats.json``, ``quarantine.jsonl``, the summary."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pipelines.config import DataConfig
from pipelines.schema import SPLITS

__all__ = ["build_stats", "format_summary", "with_total", "write_json_lines"]


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def with_total(c: Counter) -> dict[str, int]:
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
                "classes": len(info["labels"][s]),
                "labels": info["labels"][s],
                "files": sorted(files[s]),
            }
            for s in SPLITS
        },
        "cleaned": info["cleaned"],
        "warnings": info["warnings"],
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
        *(f"WARNING: {w}" for w in stats.get("warnings", ())),
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
    cleaned = {k: v for k, v in stats.get("cleaned", {}).items() if k != "by_modality"}
    if cleaned:
        lines.append(
            "cleaned: "
            + ", ".join(f"{k}={v}" for k, v in cleaned.items())
            + " ("
            + "; ".join(
                f"{m}: " + ", ".join(f"{k}={v}" for k, v in c.items())
                for m, c in stats["cleaned"]["by_modality"].items()
            )
            + ")"
        )
    lines.append(
        "splits: "
        + ", ".join(
            f"{s} {stats['splits'][s]['rows']} rows/{stats['splits'][s]['groups']} groups"
            + (f"/{stats['splits'][s]['classes']} classes" if stats["splits"][s]["classes"] else "")
            for s in SPLITS
        )
    )
    if stats["ignored_columns"]:
        lines.append(f"ignored columns: {stats['ignored_columns']}")
    lines.extend(f"WARNING: {w}" for w in stats.get("warnings", ()))
    lines.append("=" * 72)
    return "\n".join(lines)
