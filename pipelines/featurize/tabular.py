"""Tabular featurizer: one structured record -> float32 (F, 3), one row per declared field.

A record is a flat mapping of named fields, given inline in the manifest (a JSON object in
a JSONL row, a JSON string in a CSV/Parquet manifest) or as a path to a one-row CSV,
Parquet or JSON file. The fields are declared in this modality's config section
(``features.tabular`` of the data YAML), so F is fixed by the config, not by the record:

* numeric fields: the value, standardized with the mean/std of the TRAIN split
  (:meth:`TabularFeaturizer.fit` computes them in prepare; they are stored in the data
  config and travel in the export, so serving standardizes exactly like training did);
* categorical fields: a code as a float, the 1-based index in the field's ``vocab`` (0 =
  out of vocabulary) or, without a vocab, a stable hash bucket ``crc32(value) % buckets``
  (never Python's salted ``hash()``: codes must agree across processes and runs).

Item layout, one row per declared field in declaration order (:data:`VALUE`,
:data:`PRESENT`, :data:`KIND` name the columns)::

    item[f] = (value, present, kind)   # present: 1 / 0 (missing); kind: 0 numeric, 1 categorical

The kind column makes an item self-describing, so the encoder needs only the field count
from the featurizer's declared shape. A missing field (absent key, ``null``, empty string)
has value 0 and present 0 (the encoder masks it). Fields the config does not declare are
reported (``unknown_fields``: ``warn`` logs each name once per process, ``error`` refuses
the record as ``unknown_field``, ``ignore``).

Refused records (:class:`SampleError` reasons): ``bad_dtype`` (a non-numeric value for a
numeric field, a non-scalar categorical), ``non_finite`` (NaN/Inf), ``too_large`` (more
than ``max_fields`` keys, more than ``max_bytes``, a value over ``max_value_chars``),
``bad_shape`` (a nested object or list as a value, a file with more than one row),
``decode_error`` (not JSON/CSV/Parquet), ``empty`` (no declared field present).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.featurize import register
from pipelines.featurize.base import Featurizer, SampleError, normalize_suffix

log = logging.getLogger(__name__)

#: Columns of a featurized item.
VALUE, PRESENT, KIND = 0, 1, 2
NUMERIC, CATEGORICAL = "numeric", "categorical"
_KINDS = (NUMERIC, CATEGORICAL)
_UNKNOWN = ("ignore", "warn", "error")
_F32_MAX = float(np.finfo(np.float32).max)


def _demo_fields() -> list[dict[str, Any]]:
    # The OmniDigits demo column (stroke statistics of the digit plus writer metadata).
    # Any other corpus declares its own fields in ``features.tabular`` of its data YAML.
    numeric = ("strokes", "ink", "aspect", "top_ink", "left_ink", "holes")
    return [{"name": n, "kind": NUMERIC} for n in numeric] + [
        {"name": "pen", "kind": CATEGORICAL},
        {"name": "hand", "kind": CATEGORICAL},
    ]


def stable_bucket(value: str, buckets: int) -> int:
    """``crc32(value) % buckets``: the same code in every process, platform and run."""
    return zlib.crc32(value.encode("utf-8")) % buckets


def _canonical(value: Any) -> str:
    """A categorical value as the string that is looked up or hashed; JSON ``3``, Parquet
    ``3.0`` and CSV ``"3"`` give the same ``"3"``."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
    return str(value).strip()


@register("tabular")
class TabularFeaturizer(Featurizer):
    """Structured records -> float32 ``(F, 3)`` (value, present, kind) per declared field."""

    @dataclass
    class Config:
        """The ``tabular`` section of ``features:``.

        Attributes:
            fields: Declared fields in order, each ``{name, kind: numeric|categorical}``
                (optionally ``vocab: [...]`` for a categorical). Defaults to the OmniDigits
                demo's fields when neither ``fields`` nor ``numeric``/``categorical`` is set.
            numeric: Shorthand: numeric field names (appended after ``fields``).
            categorical: Shorthand: categorical field names (appended after ``numeric``).
            buckets: Hash buckets of a categorical field without a vocab (codes
                ``0..buckets-1``).
            vocab: Field name -> known values; code = 1 + index, 0 = out of vocabulary.
            stats: Numeric field name -> ``{mean, std}``, filled by ``fit`` from the train
                split (a field without stats is left unscaled).
            clip: Standardized values are clipped to ``[-clip, clip]``.
            unknown_fields: Undeclared keys: ``warn`` (log once per name), ``ignore`` or
                ``error`` (refuse as ``unknown_field``).
            max_fields: Records with more keys are ``too_large``.
            max_bytes: Records (JSON text or file) larger than this are ``too_large``.
            max_value_chars: A categorical value longer than this is ``too_large``.
        """

        fields: list[dict[str, Any]] = field(default_factory=list)
        numeric: list[str] = field(default_factory=list)
        categorical: list[str] = field(default_factory=list)
        buckets: int = 64
        vocab: dict[str, list[str]] = field(default_factory=dict)
        stats: dict[str, dict[str, float]] = field(default_factory=dict)
        clip: float = 10.0
        unknown_fields: str = "warn"
        max_fields: int = 1024
        max_bytes: int = 1_000_000
        max_value_chars: int = 256

        def __post_init__(self) -> None:
            names = [n for n, _ in self.layout()]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"tabular fields declared twice: {dup}")
            if len(names) > self.max_fields:
                raise ValueError(f"{len(names)} tabular fields exceed max_fields={self.max_fields}")
            if self.buckets < 1:
                raise ValueError(f"tabular.buckets must be >= 1, got {self.buckets}")
            if self.unknown_fields not in _UNKNOWN:
                raise ValueError(f"tabular.unknown_fields must be one of {_UNKNOWN}")
            kinds = dict(self.layout())
            for name in list(self.vocab) + list(self.stats):
                if name not in kinds:
                    raise ValueError(f"tabular vocab/stats name an undeclared field {name!r}")
            for name, st in self.stats.items():
                if kinds[name] != NUMERIC or set(st) != {"mean", "std"} or st["std"] <= 0:
                    raise ValueError(f"tabular.stats.{name} must be {{mean, std > 0}} of a numeric")

        def layout(self) -> list[tuple[str, str]]:
            """``[(name, kind), ...]`` in item row order."""
            out: list[tuple[str, str]] = []
            declared = self.fields or self.numeric or self.categorical
            for i, f in enumerate(self.fields if declared else _demo_fields()):
                if not isinstance(f, dict) or set(f) - {"name", "kind", "vocab"} or "name" not in f:
                    raise ValueError(f"tabular.fields[{i}] must be {{name, kind[, vocab]}}: {f!r}")
                kind = f.get("kind", NUMERIC)
                if kind not in _KINDS:
                    raise ValueError(f"tabular.fields[{i}].kind must be one of {_KINDS}: {kind!r}")
                out.append((str(f["name"]), kind))
            out += [(n, NUMERIC) for n in self.numeric]
            out += [(n, CATEGORICAL) for n in self.categorical]
            return out

        def vocab_of(self, name: str) -> list[str] | None:
            """The vocab of a categorical field (``vocab`` section or its ``fields`` entry)."""
            if name in self.vocab:
                return self.vocab[name]
            for f in self.fields:
                if isinstance(f, dict) and f.get("name") == name and "vocab" in f:
                    return list(f["vocab"])
            return None

    suffixes = (".json", ".csv", ".parquet")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned: set[str] = set()
        self._layout = self.section.layout()
        self._vocab = {
            n: {v: i + 1 for i, v in enumerate(vocab)}
            for n, _ in self._layout
            if (vocab := self.section.vocab_of(n)) is not None
        }
        #: Undeclared field name -> how often this process saw it (``unknown_fields`` report).
        self.unknown_counts: dict[str, int] = {}

    # -- shape --------------------------------------------------------------------
    def output_shape(self) -> tuple[int, int]:
        return (len(self._layout), 3)

    def max_output_shape(self) -> tuple[int, int]:
        return self.output_shape()

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        """``PAR1`` -> ``.parquet``; a JSON object or array -> ``.json``; text with a comma
        or a newline -> ``.csv``; None otherwise."""
        if data[:4] == b"PAR1":
            return ".parquet"
        head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
        if head[:1] in (b"{", b"["):
            return ".json"
        if b"\x00" not in head and (b"," in head or b"\n" in head):
            return ".csv"
        return None

    # -- stage 1 (decode: raw values + presence + kind) --------------------------
    def from_value(self, value: Any) -> np.ndarray:
        """An inline record: a dict or a JSON object string -> decoded ``(F, 3)``."""
        if isinstance(value, str):
            return self.from_bytes(value.encode("utf-8"), ".json")
        if not isinstance(value, dict):
            raise SampleError(
                "bad_dtype", f"a tabular record is a JSON object, not {type(value).__name__}"
            )
        return self._encode(value)

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """A one-row CSV / Parquet / JSON file (sniffed when ``suffix`` is missing)."""
        if not data or not data.strip():
            raise SampleError("empty", "zero-byte tabular record")
        if len(data) > self.section.max_bytes:
            raise SampleError(
                "too_large", f"{len(data)} bytes > max_bytes={self.section.max_bytes}"
            )
        suffix = normalize_suffix(suffix, self.sniff(data) or ".csv")
        if suffix == ".json":
            return self._encode(self._load_json(data))
        if suffix == ".csv":
            return self._encode(self._load_csv(data))
        if suffix == ".parquet":
            return self._encode(self._load_parquet(data))
        raise SampleError("unsupported_format", f"tabular suffix {suffix}")

    def _load_json(self, data: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(data.decode("utf-8-sig"))
        except RecursionError:
            raise SampleError("bad_shape", "JSON nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise SampleError("decode_error", f"not a JSON object: {e}") from None
        if isinstance(obj, list):  # a one-row JSON array of objects
            if len(obj) != 1:
                raise SampleError("bad_shape", f"JSON array holds {len(obj)} rows, want 1")
            obj = obj[0]
        if not isinstance(obj, dict):
            raise SampleError("bad_shape", f"JSON {type(obj).__name__} is not an object")
        return obj

    def _load_csv(self, data: bytes) -> dict[str, Any]:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SampleError("decode_error", f"CSV is not UTF-8: {e}") from None
        if text.count(",") + 1 > 2 * (self.section.max_fields + 1):  # header + row, cheaply
            raise SampleError("too_large", f"CSV has more than {self.section.max_fields} fields")
        try:
            rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        except csv.Error as e:
            raise SampleError("decode_error", f"CSV: {e}") from None
        if len(rows) < 2:
            raise SampleError("empty", "CSV needs a header row and one data row")
        if len(rows) > 2:
            raise SampleError("bad_shape", f"CSV holds {len(rows) - 1} data rows, want 1")
        header, row = rows
        if len(header) != len(row):
            raise SampleError("bad_shape", f"CSV header has {len(header)} names, row {len(row)}")
        return {h.strip(): v for h, v in zip(header, row, strict=True)}

    def _load_parquet(self, data: bytes) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(io.BytesIO(data))
            schema = pf.schema_arrow
            if len(schema) > self.section.max_fields:
                raise SampleError("too_large", f"{len(schema)} columns > max_fields")
            if pf.metadata.num_rows != 1:
                raise SampleError("bad_shape", f"Parquet holds {pf.metadata.num_rows} rows, want 1")
            for f in schema:
                if pa.types.is_nested(f.type):
                    raise SampleError(
                        "bad_shape", f"Parquet column {f.name!r} is nested ({f.type})"
                    )
            table = pf.read()
        except SampleError:
            raise
        except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file
            raise SampleError("decode_error", f"Parquet: {type(e).__name__}: {e}") from None
        return {
            name: col[0].as_py()
            for name, col in zip(table.column_names, table.columns, strict=True)
        }

    # -- the record -> array --------------------------------------------------------
    def _encode(self, rec: dict[str, Any]) -> np.ndarray:
        cfg = self.section
        if len(rec) > cfg.max_fields:
            raise SampleError(
                "too_large", f"record has {len(rec)} fields > max_fields={cfg.max_fields}"
            )
        layout = self._layout
        declared = {name for name, _ in layout}
        unknown = [str(k) for k in rec if k not in declared]
        if unknown:
            self._report_unknown(unknown)
        out = np.zeros((len(layout), 3), dtype=np.float32)
        for i, (name, kind) in enumerate(layout):
            out[i, KIND] = float(kind == CATEGORICAL)
            v = rec.get(name)
            if isinstance(v, dict | list | tuple | set):
                raise SampleError("bad_shape", f"field {name!r} holds a nested {type(v).__name__}")
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            out[i, VALUE] = self._numeric(name, v) if kind == NUMERIC else self._code(name, v)
            out[i, PRESENT] = 1.0
        for k, v in rec.items():  # nested values in undeclared fields are refused too
            if isinstance(v, dict | list | tuple | set):
                raise SampleError("bad_shape", f"field {k!r} holds a nested {type(v).__name__}")
        if not out[:, PRESENT].any():
            raise SampleError("empty", f"no declared field present (declared: {sorted(declared)})")
        return out

    def _numeric(self, name: str, v: Any) -> float:
        if isinstance(v, bool | np.bool_):
            raise SampleError("bad_dtype", f"numeric field {name!r} holds a boolean")
        if isinstance(v, int | float | np.integer | np.floating):
            x = float(v)
        elif isinstance(v, str):
            if len(v) > self.section.max_value_chars:
                raise SampleError("too_large", f"field {name!r}: {len(v)} characters")
            try:
                x = float(v.strip())
            except ValueError:
                raise SampleError("bad_dtype", f"numeric field {name!r} holds {v[:40]!r}") from None
        else:
            raise SampleError("bad_dtype", f"numeric field {name!r} holds a {type(v).__name__}")
        if not math.isfinite(x):
            raise SampleError("non_finite", f"numeric field {name!r} is {x}")
        if abs(x) > _F32_MAX:
            raise SampleError("non_finite", f"numeric field {name!r} overflows float32: {x}")
        return x

    def _code(self, name: str, v: Any) -> float:
        if isinstance(v, float | np.floating) and not math.isfinite(float(v)):
            raise SampleError("non_finite", f"categorical field {name!r} is {v}")
        if not isinstance(v, str | int | float | bool | np.generic):
            raise SampleError("bad_dtype", f"categorical field {name!r} holds a {type(v).__name__}")
        s = _canonical(v)
        if len(s) > self.section.max_value_chars:
            raise SampleError("too_large", f"field {name!r}: {len(s)} characters")
        vocab = self._vocab.get(name)
        if vocab is not None:
            return float(vocab.get(s, 0))
        return float(stable_bucket(s, self.section.buckets))

    def _report_unknown(self, names: list[str]) -> None:
        mode = self.section.unknown_fields
        if mode == "error":
            shown = ", ".join(repr(n[:40]) for n in names[:5])
            raise SampleError("unknown_field", f"{len(names)} undeclared field(s): {shown}")
        for n in names:
            self.unknown_counts[n] = self.unknown_counts.get(n, 0) + 1
        if mode == "warn":
            new = [n for n in names if n not in self._warned]
            if new and len(self._warned) < 100:
                self._warned.update(new)
                log.warning("tabular: undeclared field(s) ignored: %s", new[:10])

    # -- training-split statistics ------------------------------------------------
    def fit(self, items: list[np.ndarray]) -> dict | None:
        """Mean/std of each numeric field over the present values of decoded train items.

        Returns:
            ``{"stats": {name: {"mean": m, "std": s}}}`` (section updates); a field seen
            fewer than twice gets std 1, a constant field std 1 as well.
        """
        layout = self._layout
        num = [i for i, (_, k) in enumerate(layout) if k == NUMERIC]
        if not num:
            return None
        stats: dict[str, dict[str, float]] = {}
        arr = np.stack(items).astype(np.float64) if items else np.zeros((0, len(layout), 3))
        for i in num:
            vals = arr[:, i, VALUE][arr[:, i, PRESENT] > 0]
            mean = float(vals.mean()) if len(vals) else 0.0
            std = float(vals.std()) if len(vals) > 1 else 0.0
            stats[layout[i][0]] = {"mean": mean, "std": std if std > 1e-12 else 1.0}
        return {"stats": stats}

    def finalize(self, item: np.ndarray) -> np.ndarray:
        """Standardizes the present numeric values with the fitted ``stats``."""
        cfg = self.section
        if not cfg.stats:
            return item
        out = np.array(item, dtype=np.float32, copy=True)
        for i, (name, kind) in enumerate(self._layout):
            st = cfg.stats.get(name)
            if kind != NUMERIC or st is None or not out[i, PRESENT]:
                continue
            z = (float(out[i, VALUE]) - st["mean"]) / st["std"]
            out[i, VALUE] = min(max(z, -cfg.clip), cfg.clip)
        return out

    # -- examples -----------------------------------------------------------------
    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[dict[str, Any], None]:
        """An inline record whose values depend on ``label`` (0..9) for any declared layout:
        numeric fields around a per-(field, label) mean, categoricals mostly
        ``"<field>-<label>"``; one field in five is left out (never all)."""
        rec: dict[str, Any] = {}
        layout = self._layout
        keep = rng.random(len(layout)) >= 0.2
        keep[int(rng.integers(len(layout)))] = True
        for (name, kind), k in zip(layout, keep, strict=True):
            if not k:
                continue
            if kind == NUMERIC:
                mean = (stable_bucket(f"{name}:{label}", 1000) / 100.0) - 5.0
                rec[name] = round(float(mean + 0.3 * rng.standard_normal()), 4)
            else:
                vocab = self.section.vocab_of(name)
                if vocab:
                    rec[name] = (
                        vocab[label % len(vocab)] if rng.random() < 0.8 else str(rng.choice(vocab))
                    )
                else:
                    guess = int(rng.integers(10)) if rng.random() < 0.2 else label
                    rec[name] = f"{name}-{guess}"
        return rec, None
