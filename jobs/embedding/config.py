"""The typed config of ``jobs.embed`` (YAML mirror: ``configs/embed/*.yaml``).

What the model sees is NOT configured here: the featurizers are the export's
(``data_config.yaml``, fitted statistics and tokenizer included), so bulk embeddings are
those ``/v1/embeddings`` returns for the same input. This config only says what to embed,
how to cut long media, and how to run (parts, batches, actors, devices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, load_config


@dataclass
class WindowConfig:
    """How one windowed modality (audio, video, signal) is cut into segments.

    Attributes:
        seconds: Window length in seconds.
        hop: Seconds between window starts (default: ``seconds``, no overlap).
        rate_hz: Samples (steps, frames) per second of inputs that carry no rate of their
            own (signal files; default 1, so that a signal's seconds are its steps).
    """

    seconds: float = 1.0
    hop: float | None = None
    rate_hz: float | None = None

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"window seconds must be > 0, got {self.seconds}")
        if self.hop is not None and self.hop <= 0:
            raise ValueError(f"window hop must be > 0, got {self.hop}")
        if self.rate_hz is not None and self.rate_hz <= 0:
            raise ValueError(f"window rate_hz must be > 0, got {self.rate_hz}")

    @property
    def hop_s(self) -> float:
        return float(self.hop if self.hop is not None else self.seconds)


@dataclass
class EmbedConfig:
    """Everything ``jobs.embed`` needs besides ``--export``, the input and ``--out``.

    Attributes:
        modalities: Modalities to embed (default: every branch of the export).
        windows: ``{modality: WindowConfig}``: long media of these modalities are cut into
            timed segments; a modality without an entry is embedded whole (as prepare and
            the service featurize it: audio centre-cropped to ``max_frames``, video sampled
            uniformly over the clip, signal resampled to ``length``).
        fuse: Rows with several modalities also get the gated fusion of all of them
            (the ``fused`` column, as ``/v1/fuse`` computes it).
        rows_per_part: Input rows per part (one output file; the unit of resume). A prepared
            split's part is one shard file.
        batch_size: Segments per model call of an actor.
        actors: Embedding actors (0: one per CPU of the cluster, or per GPU with
            ``gpus_per_actor`` > 0).
        cpus_per_actor: CPUs each actor reserves.
        gpus_per_actor: GPUs each actor reserves (> 0 puts the model on CUDA).
        torch_threads: Intra-op threads of each actor's model.
        featurize_tasks: Concurrent featurize tasks (0: one per CPU).
        featurize_cpus: CPUs each featurize task reserves. Below 1 lets the tasks use the
            cores an actor leaves idle while it waits for input (decoding is most of the
            work for media-heavy rows).
        extra_roots: Roots besides the manifest folder that paths may point into
            (anything else is ``outside_root``, as in prepare).
        unknown_columns: ``error`` or ``warn`` for manifest columns prepare does not know.
        progress_bars: Ray Data progress bars.
    """

    modalities: list[str] | None = None
    windows: dict[str, WindowConfig] = field(default_factory=dict)
    fuse: bool = True
    rows_per_part: int = 1000
    batch_size: int = 64
    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    torch_threads: int = 1
    featurize_tasks: int = 0
    featurize_cpus: float = 0.5
    extra_roots: list[str] = field(default_factory=list)
    unknown_columns: str = "error"
    progress_bars: bool = False

    def __post_init__(self) -> None:
        if self.rows_per_part < 1 or self.batch_size < 1:
            raise ValueError("rows_per_part and batch_size must be >= 1")
        if self.actors < 0 or self.featurize_tasks < 0 or self.torch_threads < 1:
            raise ValueError("actors and featurize_tasks must be >= 0, torch_threads >= 1")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.featurize_cpus <= 0:
            raise ValueError("cpus_per_actor, gpus_per_actor must be >= 0, featurize_cpus > 0")
        if self.unknown_columns not in ("error", "warn"):
            raise ValueError("unknown_columns must be 'error' or 'warn'")


def load_embed_config(
    path: str | Path | None = None, overrides: list[str] | tuple = ()
) -> EmbedConfig:
    """Loads an embed config YAML with dotted overrides (``windows.audio.seconds=2``).

    Raises:
        ConfigError: unknown keys, wrong types or invalid values (one clear line).
    """
    try:
        return load_config(EmbedConfig, path, overrides)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"embed config: {e}") from e
