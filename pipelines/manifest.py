"""Reading a ``prepare`` manifest: format, existence, size estimate, the Ray dataset.

A manifest is JSONL (one object per line; values may be JSON objects for inline
modalities), CSV/TSV or Parquet, on any pyarrow filesystem. Columns: ``id``, ``label``,
``group`` and one per modality (:func:`pipelines.stages.known_columns`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.config import DataConfig
from pipelines.stages import ManifestError, known_columns

__all__ = [
    "check_columns",
    "check_exists",
    "estimate_rows",
    "manifest_format",
    "read_manifest",
    "unwrap_error",
]


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


def check_exists(manifest: str) -> None:
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


def head_modalities(manifest: str, modalities: Sequence[str]) -> list[str] | None:
    """Which of ``modalities`` the manifest's first rows use (JSONL: the values of the
    complete lines of its first 64 KiB; CSV: the header; Parquet: the schema); ``None``
    when that cannot be told. A hint only (which featurizers to warm up): a modality that
    first appears later is still decoded, just without the warm-up."""
    try:
        fs, path = _filesystem(manifest)
        fmt = manifest_format(manifest)
        if fmt == "parquet":
            import pyarrow.dataset as pads

            names = set(pads.dataset(path, format="parquet", filesystem=fs).schema.names)
            return [m for m in modalities if m in names]
        with fs.open_input_stream(path) as f:
            head = f.read(_PEEK_BYTES)
        if fmt == "csv":
            names = {c.strip().strip('"') for c in head.split(b"\n", 1)[0].decode().split(",")}
            return [m for m in modalities if m in names]
        seen: set[str] = set()
        lines = head.split(b"\n")
        for line in lines[:-1] if len(head) == _PEEK_BYTES else lines:
            try:
                obj = json.loads(line) if line.strip() else None
            except ValueError:
                continue  # a bad line: DecodeRows quarantines it
            if isinstance(obj, dict):
                seen.update(k for k, v in obj.items() if v not in (None, ""))
        return [m for m in modalities if m in seen]
    except (OSError, ValueError, pa.ArrowException):
        return None


def _jsonl_lines_class():
    from ray.data.datasource import FileBasedDatasource

    class JsonlLines(FileBasedDatasource):
        """A JSONL manifest as rows ``text`` (the line's bytes, undecoded) and ``line`` (its
        1-based number in the file); blank lines are skipped.

        Ray's ``read_text`` decodes each file whole, so one invalid UTF-8 byte fails the
        job, and it splits on every Unicode line boundary (``str.splitlines``); here lines
        are split on ``\\n`` only and decoded one at a time by :class:`DecodeRows`.
        """

        def _read_stream(self, f, path: str):
            data = f.readall()
            lines = data.split(b"\n")
            keep = [i for i, line in enumerate(lines) if line.strip()]
            yield pa.table(
                {
                    "text": pa.array([lines[i] for i in keep], type=pa.binary()),
                    "line": pa.array([i + 1 for i in keep], type=pa.int64()),
                }
            )

    return JsonlLines


def jsonl_datasource(manifest: str):
    """The Ray datasource of a JSONL manifest: rows ``text`` (bytes) and ``line``."""
    return _jsonl_lines_class()(manifest)


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
        # One line per row, as bytes with its line number, parsed in DecodeRows: a
        # malformed or undecodable line is quarantined as ``parse_error`` instead of
        # failing the whole file.
        return (
            ray.data.read_datasource(jsonl_datasource(manifest), override_num_blocks=num_blocks),
            True,
        )
    if fmt == "csv":
        delim = "\t" if manifest.lower().endswith(".tsv") else ","
        # Every known column as string: ids like "000123" must keep their zeros.
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in known_columns()}, strings_can_be_null=True
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


def unwrap_error(e: BaseException) -> BaseException:
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
    known = known_columns()
    unknown = sorted(set(names) - known)
    if unknown and config.unknown_columns == "error":
        raise ManifestError(
            f"{manifest}: unknown column(s) {unknown}; known: {sorted(known)}."
            " Rename them, or pass unknown_columns=warn to ignore them."
        )
    return unknown
