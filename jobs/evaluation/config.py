"""Typed evaluation config (YAML mirror: ``configs/eval/default.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common.config import ConfigError


@dataclass
class EvalConfig:
    """What ``python -m jobs.evaluate`` measures and how.

    Attributes:
        split: shard split to evaluate (``DIR/<split>/*.parquet``).
        batch_size: rows per forward pass.
        device: torch device ("cpu" by default; "cuda" when available and wanted).
        ks: recall cut-offs for retrieval.
        prompt_templates: zero-shot prompts overriding the export's (``zero_shot.yaml``,
            the templates the service uses); ``{label}`` is replaced by the class text and
            class embeddings are averaged over templates. None (default): the export's.
        label_text: optional map label -> text used in prompts (e.g. ``"7": "seven"``).
        prompt_modality: the branch that embeds the zero-shot prompts (an inline modality
            whose featurizer turns a prompt string into the branch's input).
        label_names: class names in head order; default: the export's training info,
            else the sorted labels of the split (then fusion is skipped: no head order).
        aligned_pairs: modality pairs seen together in training, e.g. ``["text-image"]``;
            default: the export's training info. Every other pair is "emergent".
        emergent_pairs: the pairs never trained together that the emergent-alignment
            figure is about, e.g. ``["audio-pointcloud"]`` (each direction is reported);
            default: the export's record (the training config's ``align.held_out_pairs``),
            else every pair never trained together. Naming an aligned pair is an error.
        fusion_modalities: modalities fused for the fusion-gain metric; default: the
            largest modality set that at least ``min_fusion_rows`` rows of the split have.
        min_fusion_rows: minimum rows for the fusion-gain metric.
        min_retrieval_rows: minimum rows having both modalities for a retrieval pair.
        projection: "pca" or "tsne" for the 2-D embedding plot.
        projection_max_points: embeddings (all modalities together) drawn at most.
        tie_decimals: scores are rounded to this many decimals before ranking (ties).
        max_rows: evaluate at most this many rows of the split (None: all).
        plots: write the PNGs.
        merge_into_export: merge the results into ``<export>/metrics.json``.
        seed: seed for subsampling and t-SNE.
    """

    split: str = "test"
    batch_size: int = 64
    device: str = "cpu"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    prompt_templates: list[str] | None = None
    label_text: dict[str, str] = field(default_factory=dict)
    prompt_modality: str = "text"
    label_names: list[str] | None = None
    aligned_pairs: list[str] | None = None
    emergent_pairs: list[str] | None = None
    fusion_modalities: list[str] | None = None
    min_fusion_rows: int = 16
    min_retrieval_rows: int = 2
    projection: str = "pca"
    projection_max_points: int = 1500
    tie_decimals: int = 6
    max_rows: int | None = None
    plots: bool = True
    merge_into_export: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks must be positive integers, got {self.ks}")
        if self.prompt_templates is not None and (
            not self.prompt_templates or any("{label}" not in t for t in self.prompt_templates)
        ):
            raise ConfigError(
                f"every prompt template must contain '{{label}}', got {self.prompt_templates}"
            )
        if self.projection not in ("pca", "tsne"):
            raise ConfigError(f"projection must be 'pca' or 'tsne', got {self.projection!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1 or null, got {self.max_rows}")
        if self.min_fusion_rows < 1 or self.min_retrieval_rows < 1:
            raise ConfigError("min_fusion_rows and min_retrieval_rows must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
