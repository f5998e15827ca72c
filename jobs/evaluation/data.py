"""Reading an evaluation split and an export's training info (no model code here)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from pipelines.schema import MODALITIES, SPLITS, unpack_table


class EvaluationError(Exception):
    """A user error (bad path, split, export, config): reported without a traceback."""


@dataclass
class SplitData:
    """One split held in memory, row-aligned.

    Attributes:
        ids: (N,) row ids.
        labels: (N,) label strings or None.
        tensors: modality -> (N,) list of featurized ndarrays or None where absent.
    """

    ids: list[str]
    labels: list[str | None]
    tensors: dict[str, list[np.ndarray | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> list[str]:
        """Modalities with at least one row, in canonical order."""
        return [m for m in MODALITIES if any(t is not None for t in self.tensors.get(m, []))]

    def rows_with(self, modalities: list[str] | tuple[str, ...]) -> np.ndarray:
        """(n,) int64 indices of the rows that have every one of ``modalities``."""
        keep = np.ones(len(self), dtype=bool)
        for m in modalities:
            col = self.tensors.get(m)
            if col is None:
                return np.zeros(0, dtype=np.int64)
            keep &= np.asarray([t is not None for t in col], dtype=bool)
        return np.flatnonzero(keep)


def _filesystem(data_dir: str | Path) -> tuple[pafs.FileSystem, str]:
    """A local path or any URI pyarrow's filesystems open (``s3://``, ``gs://``, ...)."""
    loc = str(data_dir)
    try:
        if "://" in loc:
            return pafs.FileSystem.from_uri(loc)
        return pafs.LocalFileSystem(), str(Path(loc).resolve())
    except (pa.ArrowException, ValueError, OSError) as e:
        raise EvaluationError(f"cannot open data location {loc}: {e}") from e


def _parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )


def list_splits(data_dir: str | Path) -> list[str]:
    """Names of the sub-directories of ``data_dir`` that hold Parquet files."""
    fs, root = _filesystem(data_dir)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dirs = [i for i in infos if i.type == pafs.FileType.Directory]
    return sorted(i.base_name for i in dirs if _parquet_files(fs, i.path))


def load_split(data_dir: str | Path, split: str, max_rows: int | None = None) -> SplitData:
    """Reads ``data_dir/split/*.parquet`` (Contract 2) with pyarrow (local path or URI).

    Raises:
        EvaluationError: the directory or split is missing, empty or unreadable.
    """
    fs, root = _filesystem(data_dir)
    try:
        root_info = fs.get_file_info(root)
    except (pa.ArrowException, OSError) as e:
        raise EvaluationError(f"cannot access data directory {data_dir}: {e}") from e
    if root_info.type != pafs.FileType.Directory:
        raise EvaluationError(f"data directory not found: {data_dir}")
    files = _parquet_files(fs, f"{root.rstrip('/')}/{split}")
    if not files:
        avail = list_splits(data_dir)
        raise EvaluationError(
            f"split {split!r} not found under {data_dir} (no {split}/*.parquet); "
            f"available splits: {avail or 'none'} (expected some of {list(SPLITS)})"
        )
    ids: list[str] = []
    labels: list[str | None] = []
    tensors: dict[str, list[np.ndarray | None]] = {m: [] for m in MODALITIES}
    for f in files:
        try:
            table = pq.read_table(f, filesystem=fs)
        except (pa.ArrowException, OSError) as e:
            raise EvaluationError(f"cannot read shard {f}: {e}") from e
        if "id" not in table.column_names:
            raise EvaluationError(f"shard {f} has no 'id' column; is {data_dir} a shards dir?")
        present = [
            m for m in MODALITIES if m in table.column_names and f"{m}_shape" in table.column_names
        ]
        try:
            cols = unpack_table(table, present)
        except (pa.ArrowException, ValueError) as e:
            raise EvaluationError(f"cannot decode shard {f}: {e}") from e
        n = table.num_rows
        ids.extend(str(x) for x in cols["id"])
        labels.extend(cols.get("label") or [None] * n)
        for m in MODALITIES:
            tensors[m].extend(cols[m] if m in cols else [None] * n)
        if max_rows is not None and len(ids) >= max_rows:
            break
    if max_rows is not None:
        ids, labels = ids[:max_rows], labels[:max_rows]
        tensors = {m: v[:max_rows] for m, v in tensors.items()}
    if not ids:
        raise EvaluationError(f"split {split!r} under {data_dir} has no rows")
    labels = [None if (x is None or str(x) == "") else str(x) for x in labels]
    return SplitData(ids=ids, labels=labels, tensors=tensors)


@dataclass
class TrainingInfo:
    """What evaluation needs to know about how the export was trained.

    Attributes:
        aligned_pairs: unordered modality pairs trained together (None: unknown).
        label_names: class names in classification-head order (None: unknown).
        emergent_pairs: unordered pairs held out of alignment on purpose (None: none
            recorded; the emergent figure then covers every pair never trained together).
        source: where each came from, for the report.
    """

    aligned_pairs: list[list[str]] | None = None
    label_names: list[str] | None = None
    emergent_pairs: list[list[str]] | None = None
    source: dict[str, str] = field(default_factory=dict)


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise EvaluationError(f"{path} is unreadable: {e}") from e
    return data if isinstance(data, dict) else {}


def _find_key(data: Any, key: str, depth: int = 0) -> Any:
    """First value of ``key`` in a nested mapping (breadth first, shallow keys win)."""
    if not isinstance(data, dict) or depth > 3:
        return None
    if key in data and data[key] is not None:
        return data[key]
    for v in data.values():
        found = _find_key(v, key, depth + 1)
        if found is not None:
            return found
    return None


def _as_pairs(value: Any) -> list[list[str]] | None:
    if value is None:
        return None
    if isinstance(value, dict):  # e.g. {"text-image": 1234} pair counts
        value = list(value)
    out = []
    for p in value:
        if isinstance(p, str):
            parts = [x.strip() for x in p.replace(",", "-").replace(":", "-").split("-")]
        else:
            parts = [str(x) for x in p]
        parts = [x for x in parts if x]
        if len(parts) >= 2:
            # a combination of several modalities aligns each pair within it
            out.extend([a, b] for i, a in enumerate(parts) for b in parts[i + 1 :] if a != b)
    return out


def read_training_info(export_dir: Path) -> TrainingInfo:
    """Looks for ``aligned_pairs``, ``emergent_pairs`` and ``label_names`` in the export's
    training files.

    Searched in order: ``training.yaml``, ``training.json``, ``model_config.yaml``,
    ``metrics.json`` (nested keys allowed, first match wins).
    """
    info = TrainingInfo()
    for name in ("training.yaml", "training.json", "model_config.yaml", "metrics.json"):
        data = _read_mapping(export_dir / name)
        # Our own merged results must never feed back as training info.
        data.pop("evaluation", None)
        if info.aligned_pairs is None:
            pairs = _as_pairs(_find_key(data, "aligned_pairs"))
            if pairs is not None:
                info.aligned_pairs = pairs
                info.source["aligned_pairs"] = name
        if info.emergent_pairs is None:
            held = _as_pairs(_find_key(data, "emergent_pairs"))
            if held:  # an empty record: nothing held out on purpose
                info.emergent_pairs = held
                info.source["emergent_pairs"] = name
        if info.label_names is None:
            names = _find_key(data, "label_names")
            if isinstance(names, list | tuple) and names:
                info.label_names = [str(x) for x in names]
                info.source["label_names"] = name
    return info


def read_label_text(export_dir: Path) -> dict[str, str]:
    """The export's ``{class name: prompt text}`` (``zero_shot.yaml`` ``label_text``; the
    training config's ``zero_shot_label_text``); ``{}`` when it has none."""
    data = _read_mapping(Path(export_dir) / "zero_shot.yaml")
    lt = data.get("label_text") or {}
    if not isinstance(lt, dict):
        raise EvaluationError(f"{export_dir}/zero_shot.yaml: label_text must be a mapping")
    return {str(k): str(v) for k, v in lt.items()}
