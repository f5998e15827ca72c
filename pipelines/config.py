"""Typed data-preparation config (YAML mirror: ``configs/data/*.yaml``).

``DataConfig`` is what ``jobs.prepare`` resolves and writes to ``DIR/data_config.yaml``;
its ``features`` section (:class:`FeatureConfig`) is all that featurizers need, so
training, evaluation and serving featurize exactly like the pipeline did.

Load with ``common.config.load_config(DataConfig, path, overrides)`` or
:func:`load_data_config`, which also accepts a ``data_config.yaml`` written by a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, load_config


@dataclass
class TextFeatureConfig:
    """Text cleaning and tokenization.

    Attributes:
        max_len: Token ids per sample, ``<bos>`` and ``<eos>`` included (longer is cut).
        vocab_size: Target BPE vocabulary size when a tokenizer is trained.
        min_chars: Cleaned text shorter than this is quarantined as ``empty``.
        max_chars: Cleaned text longer than this is quarantined as ``too_large``.
        max_control_fraction: Raw text whose share of control characters exceeds this is
            quarantined as ``control_chars`` (binary junk); below it they are stripped.
        lowercase: Lower-case after Unicode NFC normalization.
    """

    max_len: int = 32
    vocab_size: int = 1024
    min_chars: int = 1
    max_chars: int = 10_000
    max_control_fraction: float = 0.1
    lowercase: bool = False


@dataclass
class ImageFeatureConfig:
    """Images -> uint8 (size, size, 3): shorter side resized to ``size``, centre crop.

    Attributes:
        size: Output height and width.
        max_pixels: Decoded width*height above this is a decompression bomb (``too_large``).
    """

    size: int = 32
    max_pixels: int = 40_000_000


@dataclass
class AudioFeatureConfig:
    """Audio -> float16 (T, F) log-mel (or MFCC) frames.

    Attributes:
        sample_rate: Rate everything is resampled to (Hz).
        features: ``logmel`` or ``mfcc``.
        n_mels: Mel bins (F for ``logmel``).
        n_mfcc: Cepstral coefficients kept (F for ``mfcc``).
        win_ms: Analysis window length in milliseconds.
        hop_ms: Hop between frames in milliseconds.
        max_frames: T is at most this; longer clips are centre-cropped.
        max_seconds: Clips longer than this are ``too_large`` (checked from the header).
        normalize: Per-utterance mean/variance normalization of each feature bin.
    """

    sample_rate: int = 16_000
    features: str = "logmel"
    n_mels: int = 40
    n_mfcc: int = 20
    win_ms: float = 25.0
    hop_ms: float = 10.0
    max_frames: int = 128
    max_seconds: float = 600.0
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.features not in ("logmel", "mfcc"):
            raise ValueError(f"audio.features must be 'logmel' or 'mfcc', got {self.features!r}")

    @property
    def num_features(self) -> int:
        return self.n_mels if self.features == "logmel" else self.n_mfcc


@dataclass
class VideoFeatureConfig:
    """Video -> uint8 (num_frames, size, size, 3), frames sampled uniformly.

    Attributes:
        num_frames: Frames sampled uniformly over the clip.
        size: Output height and width (shorter side resize + centre crop).
        max_frames: Clips with more frames are ``too_large``.
        max_pixels: Frames with more pixels are ``too_large``.
    """

    num_frames: int = 8
    size: int = 32
    max_frames: int = 100_000
    max_pixels: int = 8_300_000


@dataclass
class PointCloudFeatureConfig:
    """Point clouds -> float16 (num_points, 3 [+3 normals] [+3 colours]).

    Attributes:
        num_points: N after farthest-point sampling (smaller clouds are tiled).
        normals: Append normals (zeros when the file has none).
        colors: Append RGB colours in [0, 1] (zeros when the file has none).
        max_points: Clouds with more points are ``too_large``.
    """

    num_points: int = 256
    normals: bool = False
    colors: bool = False
    max_points: int = 5_000_000

    @property
    def num_channels(self) -> int:
        return 3 + 3 * int(self.normals) + 3 * int(self.colors)


@dataclass
class SignalFeatureConfig:
    """Multichannel signals -> float16 (channels, length), per-channel z-normalized.

    ``.npy`` arrays are read as (C, L) (1-D as (1, L)); CSV columns are channels, rows
    are time steps.

    Attributes:
        channels: Required channel count C (``None`` keeps whatever the file has).
        length: L after linear resampling.
        max_channels: More channels is ``too_large``.
        max_length: More time steps is ``too_large``.
    """

    channels: int | None = 3
    length: int = 128
    max_channels: int = 1024
    max_length: int = 10_000_000


@dataclass
class FeatureConfig:
    """Per-modality featurization sizes (INTERFACES §1)."""

    text: TextFeatureConfig = field(default_factory=TextFeatureConfig)
    image: ImageFeatureConfig = field(default_factory=ImageFeatureConfig)
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    video: VideoFeatureConfig = field(default_factory=VideoFeatureConfig)
    pointcloud: PointCloudFeatureConfig = field(default_factory=PointCloudFeatureConfig)
    signal: SignalFeatureConfig = field(default_factory=SignalFeatureConfig)
    #: Raw files larger than this (bytes) are ``too_large`` before being read.
    max_file_bytes: int = 512 * 1024 * 1024

    def section(self, modality: str):
        """The config section of ``modality`` (``None`` for a modality without one)."""
        return getattr(self, modality, None)


@dataclass
class DedupeConfig:
    """Exact and near-duplicate removal (duplicates -> ``duplicate_of:<id>``).

    The smallest id of a duplicate cluster survives, so every run keeps the same one.

    Attributes:
        exact: Modalities deduplicated by content hash (raw bytes; cleaned text).
        near_image: Near-duplicate images by 64-bit perceptual hash (DCT pHash).
        image_hamming: Max Hamming distance between pHashes counted as duplicates.
        near_text: Near-duplicate texts by MinHash over character shingles.
        text_jaccard: Min estimated Jaccard similarity counted as duplicate.
        text_shingle: Character shingle length.
        text_num_perm: MinHash permutations (must be divisible by ``text_bands``).
        text_bands: LSH bands used to find candidate pairs.
        text_min_chars: Texts shorter than this skip near-dedupe (too little evidence).
        drop_text_of_duplicate_rows: When every other modality of a row is a duplicate of
            the same survivor row and its text equals the survivor's text up to case,
            spacing and punctuation, the text goes too (a whole duplicated row), even when
            text is not deduplicated on its own (templated captions repeat). A new caption
            of duplicated content is kept.
    """

    exact: list[str] = field(
        default_factory=lambda: ["text", "image", "audio", "video", "pointcloud", "signal"]
    )
    near_image: bool = True
    image_hamming: int = 4
    near_text: bool = True
    text_jaccard: float = 0.8
    text_shingle: int = 5
    text_num_perm: int = 64
    text_bands: int = 16
    text_min_chars: int = 24
    drop_text_of_duplicate_rows: bool = True

    def __post_init__(self) -> None:
        if self.text_num_perm % self.text_bands:
            raise ValueError("dedupe.text_num_perm must be divisible by dedupe.text_bands")


@dataclass
class SplitConfig:
    """Deterministic split by a hash of ``group`` (the id when a row has no group).

    Attributes:
        train: Share of groups in train.
        val: Share in val (test gets the rest).
        test: Share in test.
        salt: Mixed into the hash; change it to draw another split.
    """

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = "omniray"

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if min(self.train, self.val, self.test) < 0 or abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {total}")


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
    """

    batch_size: int = 32
    concurrency: int | None = None
    # Decode stage alone on 2 cores, warm workers, 2,000 OmniDigits rows: 64-row blocks
    # 14.5-17.8 s, 256-row blocks 12.4 s (each task costs ~0.1-0.2 s of scheduling).
    rows_per_block: int = 256
    decode_memory_mb: int = 512
    progress_bars: bool = True
    warm_workers: bool = True


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
            ``id``, ``label``, ``group`` or a modality.
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

    Raises:
        ConfigError: The file is missing or its ``features`` section does not validate.
    """
    from common.config import from_dict, read_yaml

    section = read_yaml(path).get("features") or {}
    try:
        return from_dict(FeatureConfig, section, where=f"{path}.features")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ checks of nested sections
        raise ConfigError(f"{path}.features: {e}") from e
