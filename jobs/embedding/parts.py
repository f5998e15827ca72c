"""The input of ``jobs.embed`` cut into parts: the unit of work, of output and of resume.

A part must be the same rows on every run, so that a re-run can skip the parts whose
output file is already there. Ray Data's own readers split a file into blocks by size
and parallelism, which differs between runs and clusters, so the driver plans the parts
itself, cheaply and with flat memory, and Ray Data tasks read them:

* JSONL / CSV manifests: byte ranges of ``rows_per_part`` lines, found by streaming the
  file once in 8 MiB chunks (only newline positions are counted; a CSV's header line is
  carried with every part). As pyarrow's CSV reader by default, values must not contain
  newlines.
* Parquet manifests: one part per row group.
* Prepared splits (``--data SHARDS/SPLIT``): one part per shard file.

Reading a manifest part gives the same Arrow batch Ray Data's readers give
:class:`pipelines.stages.DecodeRows` (``text`` lines for JSONL; string columns for CSV,
as :func:`pipelines.manifest.read_manifest` converts them).
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.manifest import manifest_format
from pipelines.stages import ManifestError, known_columns

_CHUNK = 8 * 2**20


@dataclass
class Part:
    """One part of the input.

    Attributes:
        index: Part number (output ``part-<index>.parquet``).
        kind: ``jsonl``, ``csv``, ``parquet`` (a manifest row group) or ``shard``.
        path: File (local path or URI).
        start: First byte (text) or row group index (parquet); 0 for a shard.
        stop: End byte (text); unused otherwise.
        header: A CSV manifest's header line.
    """

    index: int
    kind: str
    path: str
    start: int = 0
    stop: int = 0
    header: str = ""

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def plan_manifest(manifest: str, rows_per_part: int) -> list[Part]:
    """Parts of a JSONL/CSV/Parquet manifest (see the module docstring).

    Raises:
        ManifestError: unknown format, unreadable file.
    """
    fmt = manifest_format(manifest)
    fs, path = filesystem(manifest)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                n = pq.ParquetFile(f).metadata.num_row_groups
            return [Part(i, "parquet", manifest, start=i) for i in range(n)]
        return _plan_text(fs, path, manifest, fmt, rows_per_part)
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"cannot read manifest {manifest}: {e}") from e


def _plan_text(fs: pafs.FileSystem, path: str, manifest: str, fmt: str, rows: int) -> list[Part]:
    header = ""
    parts: list[Part] = []
    with fs.open_input_stream(path) as f:
        pos = 0  # bytes consumed so far
        start = 0  # first byte of the current part
        lines = 0  # newlines seen in the current part
        first = True
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            off = 0
            if first and fmt == "csv":
                nl = chunk.find(b"\n")
                if nl < 0:
                    raise ManifestError(f"{manifest}: CSV header longer than {_CHUNK} bytes")
                header = chunk[: nl + 1].decode("utf-8", errors="replace")
                off = start = nl + 1
            first = False
            while True:
                nl = chunk.find(b"\n", off)
                if nl < 0:
                    break
                lines += 1
                off = nl + 1
                if lines == rows:
                    end = pos + off
                    parts.append(Part(len(parts), fmt, manifest, start, end, header))
                    start, lines = end, 0
            pos += len(chunk)
    if pos > start:
        parts.append(Part(len(parts), fmt, manifest, start, pos, header))
    return parts


def plan_split(split_dir: str) -> list[Part]:
    """One part per ``*.parquet`` shard of a prepared split (sorted by name).

    Raises:
        ManifestError: no shards there.
    """
    files = sorted(Path(split_dir).glob("*.parquet"))
    if not files:
        raise ManifestError(f"prepared split {split_dir} has no *.parquet shards")
    return [Part(i, "shard", str(f)) for i, f in enumerate(files)]


def read_part(part: dict[str, Any]) -> pa.Table:
    """The rows of one manifest part, as Ray Data's readers give them to ``DecodeRows``
    (JSONL: a ``text`` column of non-empty lines; CSV and Parquet: the columns)."""
    kind, path = part["kind"], part["path"]
    fs, p = filesystem(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(p) as f:
            return pq.ParquetFile(f).read_row_group(int(part["start"]))
    with fs.open_input_file(p) as f:
        f.seek(int(part["start"]))
        data = f.read(int(part["stop"]) - int(part["start"]))
    if kind == "jsonl":
        lines = [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()]
        return pa.table({"text": pa.array(lines, type=pa.string())})
    import pyarrow.csv as pacsv

    body = part["header"].encode() + data
    delim = "\t" if path.lower().endswith(".tsv") else ","
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in known_columns()}, strings_can_be_null=True
    )
    return pacsv.read_csv(
        io.BytesIO(body),
        parse_options=pacsv.ParseOptions(delimiter=delim),
        convert_options=convert,
    )
