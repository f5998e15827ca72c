"""Typed data-preparation config (YAML mirror: ``configs/data/*.yaml``).

``DataConfig`` is what ``jobs.prepare`` resolves and writes to ``DIR/data_config.yaml``;
its ``features`` section (:class:`FeatureConfig`) is all that featurizers need, so
training, evaluation and serving featurize exactly like the pipeline did.

Load with ``common.config.load_config(DataConfig, path, overrides)`` or
:func:`load_data_config`, which also accepts a ``data_config.yaml`` written by a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, deep_merge, from_dict, load_config, read_yaml, to_dict
from common.modalities import modality_names


class FeatureConfig:
    """Per-modality featurization settings: modality -> that featurizer's ``Config``.

    Generic: the sections are the ``Config`` dataclasses the featurizers declare
    (``pipelines/featurize/<modality>.py``); a modality without an explicit section gets its
    defaults. YAML shape: ``features: {<modality>: {<field>: value}, max_file_bytes: n}``.

    Args:
        sections: ``{modality: Config instance or mapping}`` (validated).
        max_file_bytes: Raw files larger than this (bytes) are ``too_large`` before being read.

    Example::

        fc = FeatureConfig.from_config_dict({m: {"size": 64}})   # m: a modality name
        fc.section(m).size == getattr(fc, m).size == 64          # e.g. fc.image.size
        fc.with_overrides({m: {"max_pixels": 1000}})   # a new, validated FeatureConfig

    Raises:
        ConfigError: An unknown modality or field, or a value a section refuses.
    """

    DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024

    def __init__(
        self,
        sections: Mapping[str, Any] | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.max_file_bytes = int(max_file_bytes)
        self._sections: dict[str, Any] = {}
        for name, sec in (sections or {}).items():
            cls = _section_class(name, "features", data=sec)
            if not isinstance(sec, Mapping) and getattr(sec, "tower", ""):
                cls = type(sec)
            if isinstance(sec, cls):
                self._sections[name] = sec
            elif isinstance(sec, Mapping):
                self._sections[name] = _build_section(cls, sec, f"features.{name}")
            else:
                raise ConfigError(f"features.{name}: expected a mapping, got {sec!r}")

    def section(self, modality: str) -> Any:
        """The ``Config`` of ``modality`` (its featurizer's defaults when not given).

        Raises:
            KeyError: No featurizer is registered under ``modality``.
        """
        sec = self._sections.get(modality)
        if sec is None:
            cls = _section_class(modality, "features", error=KeyError)
            sec = self._sections[modality] = cls()
        return sec

    def __getattr__(self, name: str) -> Any:
        # ``fc.image.size``: attribute access to a section.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.section(name)
        except KeyError:
            raise AttributeError(f"FeatureConfig has no section {name!r}") from None

    @classmethod
    def from_config_dict(cls, data: Mapping[str, Any], where: str = "features") -> FeatureConfig:
        """Validated ``FeatureConfig`` from the ``features`` mapping of a YAML file."""
        data = dict(data)
        mfb = data.pop("max_file_bytes", cls.DEFAULT_MAX_FILE_BYTES)
        if isinstance(mfb, bool) or not isinstance(mfb, int | float) or int(mfb) != mfb:
            raise ConfigError(f"{where}.max_file_bytes: expected int, got {mfb!r}")
        sections = {}
        for name, sec in data.items():
            sc = _section_class(name, where, data=sec)
            if sec is None:
                sec = {}
            if not isinstance(sec, Mapping):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {sec!r}")
            sections[name] = _build_section(sc, sec, f"{where}.{name}")
        return cls(sections, max_file_bytes=int(mfb))

    def to_config_dict(self) -> dict[str, Any]:
        """Every registered modality's section (defaults included), then ``max_file_bytes``."""
        from pipelines.featurize import FEATURIZERS

        out: dict[str, Any] = {m: to_dict(self.section(m)) for m in _ordered(FEATURIZERS)}
        for m, sec in self._sections.items():  # sections of featurizers since unregistered
            out.setdefault(m, to_dict(sec))
        out["max_file_bytes"] = self.max_file_bytes
        return out

    def with_overrides(self, update: Mapping[str, Any]) -> FeatureConfig:
        """A new config: ``update`` deep-merged onto this one, then validated."""
        return FeatureConfig.from_config_dict(deep_merge(self.to_config_dict(), update))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureConfig):
            return NotImplemented
        return self.to_config_dict() == other.to_config_dict()

    def __repr__(self) -> str:
        return f"FeatureConfig({self.to_config_dict()!r})"

    def __deepcopy__(self, memo: dict) -> FeatureConfig:
        return FeatureConfig.from_config_dict(self.to_config_dict())


def _ordered(names) -> list[str]:
    """``names`` in modality-table order (undeclared ones last, sorted)."""

    table = [m for m in modality_names() if m in names]
    return table + sorted(set(names) - set(table))


def _section_class(
    name: str, where: str, error: type[Exception] = ConfigError, data: Any = None
) -> type:
    from pipelines.featurize import FEATURIZERS

    if name not in FEATURIZERS:
        raise error(
            f"{where}: unknown key {name!r}; valid keys: "
            f"{_ordered(FEATURIZERS) + ['max_file_bytes']}"
        )
    if isinstance(data, Mapping) and data.get("tower"):
        # A pretrained tower's processor is this modality's featurizer.
        from pipelines.featurize._towers import TOWER_FEATURIZERS

        if name not in TOWER_FEATURIZERS:
            raise error(
                f"{where}.{name}.tower: no pretrained-tower featurizer for {name!r} "
                f"(towers serve {sorted(TOWER_FEATURIZERS)})"
            )
        return TOWER_FEATURIZERS[name].Config
    return FEATURIZERS[name].Config


def _build_section(cls: type, data: Mapping[str, Any], where: str) -> Any:
    try:
        return from_dict(cls, data, where=where)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ checks
        raise ConfigError(f"{where}: {e}") from e


@dataclass
class DedupeConfig:
    """Duplicate samples out (``duplicate_of:<id>``), repeated captions kept.

    Deduplication is of samples: an exact or near duplicate of a medium (an image, a
    recording...) is dropped. Modalities whose featurizer is a caption
    (:meth:`~pipelines.featurize.base.Featurizer.is_caption`: inline text, a metadata record)
    describe a sample rather than being one: the same caption on different media is
    legitimate (one caption per class) and is kept unless ``captions`` opts in. The smallest
    id of a duplicate cluster survives, so every run keeps the same one. Which
    near-duplicate method a modality uses is its featurizer's ``near_dedupe`` (``phash``:
    64-bit DCT perceptual hash of an image; ``minhash``: MinHash over the character
    shingles of a string).

    Attributes:
        exact: Modalities deduplicated by content hash (raw bytes; a cleaned inline value).
            ``None``: every modality (captions only with ``captions``).
        near: Modalities deduplicated by their featurizer's near-duplicate method
            (``None``: every modality whose featurizer has one; captions only with
            ``captions``).
        captions: Opt-in filter: also deduplicate caption modalities on their own (exact and
            near), e.g. scraped alt-texts where a repeated caption is spam. Listing a caption
            modality in ``exact``/``near`` without it is an error.
        phash_hamming: Max Hamming distance between pHashes counted as duplicates.
        phash_min_side: Images whose shorter side (as stored, read from the file's header)
            is below this skip near-dedupe (too little evidence: distinct 8x8 scans of one
            digit hash within a few bits of each other); exact duplicates are still found.
        minhash_jaccard: Min estimated Jaccard similarity counted as duplicate.
        minhash_shingle: Character shingle length.
        minhash_num_perm: MinHash permutations (must be divisible by ``minhash_bands``).
        minhash_bands: LSH bands used to find candidate pairs.
        minhash_min_chars: Strings shorter than this skip near-dedupe (too little evidence).
        drop_captions_of_duplicate_rows: When every other modality of a row is a duplicate
            of the same survivor row, a caption equal to the survivor's (text: up to case,
            spacing and punctuation; other captions: exactly) goes too: the whole row is a
            copy. A new caption of duplicated content is kept.
    """

    exact: list[str] | None = None
    near: list[str] | None = None
    captions: bool = False
    phash_hamming: int = 4
    phash_min_side: int = 32
    minhash_jaccard: float = 0.8
    minhash_shingle: int = 5
    minhash_num_perm: int = 64
    minhash_bands: int = 16
    minhash_min_chars: int = 24
    drop_captions_of_duplicate_rows: bool = True

    def __post_init__(self) -> None:
        if self.minhash_num_perm % self.minhash_bands:
            raise ValueError("dedupe.minhash_num_perm must be divisible by dedupe.minhash_bands")
        names = set(modality_names())
        for key in ("exact", "near"):
            bad = sorted(set(getattr(self, key) or ()) - names)
            if bad:
                raise ValueError(f"dedupe.{key}: unknown modalities {bad}")


@dataclass
class SplitConfig:
    """Train/val/test assignment (:mod:`pipelines.splits`).

    A manifest ``split`` column (``train``/``val``/``test``) fixes a row's split; the other
    rows follow their ``group`` (the id when a row has no group): groups are dealt into the
    splits in the order of a salted hash, per label when rows have labels, so that every
    class reaches every split it can. An empty split or one without classes that train has
    is reported in ``stats.json`` ``warnings`` and on the console.

    Attributes:
        train: Share of rows in train.
        val: Share in val.
        test: Share in test (the three sum to 1).
        salt: Mixed into the hash; change it to draw another split.
        stratify: Deal groups per label (their most common one); off: all groups at once.
    """

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = "omniray"
    stratify: bool = True

    def __post_init__(self) -> None:
        for key in ("train", "val", "test"):
            if getattr(self, key) < 0:
                raise ValueError(f"split.{key} must be >= 0, got {getattr(self, key)}")
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split.train + split.val + split.test must sum to 1, got "
                f"{self.train:g} + {self.val:g} + {self.test:g} = {total:g}"
            )


@dataclass
class ExecutionConfig:
    """Ray Data execution knobs.

    Attributes:
        batch_size: Manifest rows per decode batch (one actor call).
        concurrency: Max concurrent decode tasks (``None``: one per cluster CPU).
        rows_per_block: Manifest rows per block after reading (the unit of parallelism).
        decode_memory_mb: Memory reserved per decode task (bounds concurrency on small nodes).
        progress_bars: Ray Data progress bars.
        warm_workers: Before the decode stage starts, one task per CPU but one loads in a
            worker what a first decode task loads (Ray Data, the featurizers' libraries:
            ~1.5 s per process), while the driver plans and Ray Data starts up, which
            runs one task at a time until its first resource reservation arrives.
        decode_retries: Times Ray retries a decode task whose worker died (Ray Data's
            default is forever, so one input that kills its worker would stop the job
            from ever finishing). Native decoders run in a sacrificial child process
            (featurizer ``isolate``), so a hostile file is quarantined rather than killing
            the worker; these retries are for lost nodes.
    """

    batch_size: int = 32
    concurrency: int | None = None
    # Decode stage alone on 2 cores, warm workers, 2,000 OmniDigits rows: 64-row blocks
    # 14.5-17.8 s, 256-row blocks 12.4 s (each task costs ~0.1-0.2 s of scheduling).
    rows_per_block: int = 256
    decode_memory_mb: int = 512
    progress_bars: bool = True
    warm_workers: bool = True
    decode_retries: int = 2


@dataclass
class DataConfig:
    """Everything ``jobs.prepare`` needs besides ``--manifest`` and ``--out``.

    Attributes:
        name: Free-form name of the data config.
        features: Featurization sizes (shared with training and serving).
        dedupe: Duplicate removal.
        split: Train/val/test split.
        execution: Ray Data knobs.
        tokenizer_path: Existing tokenizer dir (or ``tokenizer.json``); ``None`` trains one
            on the corpus text.
        rows_per_shard: Rows per output Parquet file.
        extra_roots: Roots (local dirs or URIs) besides the manifest folder that paths may
            point into; everything else is ``outside_root``.
        unknown_columns: ``error`` (default) or ``warn`` for manifest columns that are not
            ``id``, ``label``, ``group``, ``split`` or a modality.
    """

    name: str = "default"
    features: FeatureConfig = field(default_factory=FeatureConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    tokenizer_path: str | None = None
    rows_per_shard: int = 2048
    extra_roots: list[str] = field(default_factory=list)
    unknown_columns: str = "error"

    def __post_init__(self) -> None:
        if self.unknown_columns not in ("error", "warn"):
            raise ValueError("unknown_columns must be 'error' or 'warn'")
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")


def load_data_config(
    path: str | Path | None = None, overrides: list[str] | tuple = ()
) -> DataConfig:
    """Loads a data config YAML (or a run's ``data_config.yaml``) with dotted overrides."""
    try:
        return load_config(DataConfig, path, overrides)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ checks of nested sections
        raise ConfigError(f"{path or 'DataConfig'}: {e}") from e


def load_feature_config(path: str | Path) -> FeatureConfig:
    """Only the ``features`` section of a ``data_config.yaml`` (as copied into exports).

    Consumers of an export (evaluation, serving) need nothing else, and an export must stay
    loadable when unrelated sections of :class:`DataConfig` (execution, dedupe, ...) change.
    There is no fallback to defaults: a missing file or section is an error.

    Raises:
        ConfigError: The file is missing, has no ``features`` section, or it does not
            validate.
    """
    data = read_yaml(path)
    section = data.get("features")
    if not isinstance(section, Mapping):
        raise ConfigError(f"{path}: no 'features' mapping (not a data_config.yaml?)")
    return FeatureConfig.from_config_dict(section, where=f"{path}.features")
