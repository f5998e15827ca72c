"""DeepSpeed checkpoints reported through Ray Train, and finding a usable one to resume from.

Layout of one reported checkpoint (``checkpoint_{step:08d}`` in Ray Train storage; every rank
uploads its own files and Ray merges them into the one directory)::

    ds/                       DeepSpeed ``save_checkpoint(dir, tag="ds")`` output (per-rank
                              ZeRO partitions, ``mp_rank_00_model_states.pt`` from rank 0)
    latest                    DeepSpeed's pointer to the tag
    rank{r}.json              train state of rank r: step, epoch, batch, world size
    rng_rank{r}.safetensors   torch RNG state of rank r (no pickle)
    complete_rank{r}.json     written last: rank r's part is entirely on disk

A checkpoint is *complete* when every rank's marker is present. Ray bug #41700: a worker
crash right after ``ray.train.report(checkpoint=...)`` can register a checkpoint whose files
did not all arrive, so :func:`find_resumable` falls back to the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

DS_TAG = "ds"
CKPT_RE = re.compile(r"^checkpoint_(\d{8})$")


@dataclass
class TrainState:
    """Where a rank is: optimizer steps done, epoch and micro-batches consumed in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    world_size: int = 1
    stage: str = ""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def write_rank_state(ckpt_dir: str, rank: int, state: TrainState) -> None:
    """Writes this rank's train state, RNG states and (last) its completion marker."""
    with open(os.path.join(ckpt_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                **asdict(state),
                "python_rng": _jsonable(random.getstate()),
                "numpy_rng": _jsonable(np.random.get_state()),
            },
            f,
        )
    save_file(
        {"torch": torch.get_rng_state()}, os.path.join(ckpt_dir, f"rng_rank{rank}.safetensors")
    )
    with open(os.path.join(ckpt_dir, f"complete_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": state.world_size, "step": state.step}, f)


def read_rank_state(ckpt_dir: str, rank: int, *, restore_rng: bool = True) -> TrainState:
    """Reads a rank's train state (rank 0's when this rank did not exist at save time)."""
    path = os.path.join(ckpt_dir, f"rank{rank}.json")
    if not os.path.exists(path):
        path, rank = os.path.join(ckpt_dir, "rank0.json"), 0
    with open(path) as f:
        d = json.load(f)
    if restore_rng:
        random.setstate(_tuplify(d["python_rng"]))
        ns = d["numpy_rng"]
        np.random.set_state((ns[0], np.asarray(ns[1], dtype=np.uint32), *ns[2:]))
        torch.set_rng_state(
            load_file(os.path.join(ckpt_dir, f"rng_rank{rank}.safetensors"))["torch"]
        )
    return TrainState(**{k: d[k] for k in ("step", "epoch", "batch", "world_size", "stage")})


def is_complete(fs: pafs.FileSystem, path: str) -> bool:
    """All ranks' markers and the DeepSpeed tag dir are present in checkpoint ``path``."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except (FileNotFoundError, OSError):
        return False
    names = {os.path.basename(i.path) for i in infos}
    markers = [n for n in names if n.startswith("complete_rank")]
    if not markers or DS_TAG not in names:
        return False
    with fs.open_input_stream(f"{path}/{sorted(markers)[0]}") as f:
        world = int(json.loads(f.read().decode())["world_size"])
    return all(f"complete_rank{r}.json" in names for r in range(world))


def list_checkpoints(experiment_path: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint_*`` dir under a Ray Train run, newest first."""
    fs, root = pafs.FileSystem.from_uri(_as_uri(experiment_path))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    out = []
    for i in infos:
        m = CKPT_RE.match(os.path.basename(i.path))
        if m and i.type == pafs.FileType.Directory:
            out.append((int(m.group(1)), i.path))
    return sorted(out, reverse=True)


def find_resumable(
    experiment_path: str, preferred: str | None = None
) -> tuple[str, pafs.FileSystem] | None:
    """The newest complete checkpoint: ``preferred`` (Ray's latest) if complete, else older ones.

    Args:
        experiment_path: The Ray Train run dir (``storage_path/name``), local path or URI.
        preferred: Path of the checkpoint Ray Train offers (``get_checkpoint().path``).

    Returns:
        ``(path, filesystem)`` or ``None`` when no complete checkpoint exists.
    """
    fs, _ = pafs.FileSystem.from_uri(_as_uri(experiment_path))
    if preferred is not None and is_complete(fs, preferred):
        return preferred, fs
    for _, path in list_checkpoints(experiment_path):
        if is_complete(fs, path):
            return path, fs
    return None


def dir_bytes(path: str) -> int | None:
    """Bytes of the files under a local dir (links not followed); None for a URI."""
    if "://" in path:
        return None
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed while walking
                continue
            total += st.st_size
    return total


def disk_usage(run_dir: str, storage: str, export: str) -> dict[str, Any]:
    """What a run leaves on disk: the run dir, and in it (or beside it) the Ray Train
    storage (checkpoints) and the export.

    Returns:
        ``{"run_dir": path, "total_bytes": int, "checkpoints_bytes": int | None,
        "export_bytes": int | None}``; ``total_bytes`` counts the run dir plus the storage
        and export when they lie outside it; None where a dir is a URI.
    """
    run = os.path.abspath(run_dir)
    total = dir_bytes(run) or 0
    parts: dict[str, int | None] = {}
    for key, path in (("checkpoints_bytes", storage), ("export_bytes", export)):
        parts[key] = dir_bytes(path) if "://" in path or os.path.isdir(path) else 0
        inside = "://" not in path and os.path.abspath(path).startswith(run + os.sep)
        if not inside:
            total += parts[key] or 0
    return {"run_dir": run, "total_bytes": total, **parts}


def format_disk(d: dict[str, Any]) -> str:
    """One line: ``disk used by the run: 12.3 MB (checkpoints 10.1 MB, export 2.0 MB)``."""

    def mb(x: int | None) -> str:
        return "n/a (remote)" if x is None else f"{x / 1e6:.1f} MB"

    return (
        f"disk used by the run: {mb(d['total_bytes'])} under {d['run_dir']} "
        f"(checkpoints {mb(d['checkpoints_bytes'])}, export {mb(d['export_bytes'])})"
    )


def _as_uri(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
