"""Typed arguments of the OmniRay Serve application (the ``args:`` section of a serve YAML).

Ray Serve's typed app-builder pattern: ``serve.app.build_app`` receives these fields either
as a plain dict (``serve run configs/serve/demo.yaml``, ``serve run serve.app:build_app
export_dir=...``) or as an :class:`OmniServeArgs`; pydantic validates them once, in the
driver, so a wrong key or type fails before any replica starts.

Replica counts, autoscaling, resources, ``max_ongoing_requests`` and ``max_queued_requests``
are *not* here: they belong to the ``deployments:`` section of the serve YAML (Ray Serve's
own schema), keyed by the deployment names in :data:`serve.app.DEPLOYMENT_NAMES`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.schema import MODALITIES


class _Strict(BaseModel):
    # Unknown keys are an error (as in common.config): a typo must not be ignored silently.
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Request limits; exceeding one gives HTTP 413, never a 5xx.

    Attributes:
        max_body_bytes: Largest accepted HTTP body (checked before JSON parsing).
        max_items: Most inputs in one ``/v1/embeddings`` request (and labels in classify).
        max_text_chars: Longest text input, in characters.
        max_image_pixels: Largest decoded image, width × height (read from the header,
            before decoding, so decompression bombs are refused cheaply).
        max_audio_seconds: Longest audio clip.
        max_video_frames: Most frames in a video container.
        max_points: Most points in a point cloud.
        max_signal_channels: Most channels of a signal.
        max_signal_length: Most time steps of a signal.
        max_k: Largest ``k`` for ``/v1/search``.
        request_timeout_s: Router-side deadline of one request (503 when exceeded).
        max_inflight: Requests the router works on at once; more are refused with 503
            (the OpenAI error shape), so overload never grows memory without bound.
    """

    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_items: int = Field(64, ge=1)
    max_text_chars: int = Field(2000, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_video_frames: int = Field(2000, ge=1)
    max_points: int = Field(500_000, ge=1)
    max_signal_channels: int = Field(64, ge=1)
    max_signal_length: int = Field(200_000, ge=1)
    max_k: int = Field(100, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    max_inflight: int = Field(256, ge=1)


class BatchingConfig(_Strict):
    """Dynamic batching of one modality deployment (``@serve.batch``).

    A batch closes when ``max_batch_size`` items are queued, when their summed cost
    (text tokens, audio frames, video frames, points, signal samples, image pixels / 1024)
    reaches ``max_batch_cost``, or after ``batch_wait_timeout_s``.

    Attributes:
        enabled: False runs every request alone (for benchmarks: batching on vs off).
        max_batch_size: Most items in one batch.
        max_batch_cost: Most summed cost in one batch; an item costlier than this runs alone.
        batch_wait_timeout_s: How long the first item of a batch waits for company.
    """

    enabled: bool = True
    max_batch_size: int = Field(32, ge=1)
    max_batch_cost: int = Field(8192, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)


class GalleryConfig(_Strict):
    """The retrieval gallery of ``/v1/search``, embedded at start-up from a prepared split.

    Attributes:
        split_dir: A prepared split (``DIR/test`` of Contract 2, Parquet shards); None
            disables ``/v1/search`` (503 with a clear message).
        modalities: Target modalities to index (default: every served modality present).
        max_items: Cap on indexed rows (the first rows by id).
        chunk_size: Items per embedding call while building the index.
    """

    split_dir: str | None = None
    modalities: list[str] | None = None
    max_items: int = Field(100_000, ge=1)
    chunk_size: int = Field(64, ge=1)


class OmniServeArgs(_Strict):
    """Arguments of :func:`serve.app.build_app`.

    Attributes:
        export_dir: Export directory of Contract 3 (``model.safetensors``,
            ``model_config.yaml``, ``tokenizer/``, ``data_config.yaml``).
        modalities: Modalities to serve; one deployment each. None = all six.
        model_name: The id reported by ``/v1/models`` and accepted as ``model``.
        quantization: ``int8`` loads replicas with dynamically-quantized Linear layers.
        api_key: When set, every ``/v1/*`` request needs ``Authorization: Bearer <key>``.
            ``env:NAME`` reads it from the environment variable ``NAME``.
        torch_threads: Intra-op threads per replica (keep low: replicas share cores).
        limits: Request limits.
        batching: Default batching for every modality deployment.
        batching_overrides: Per-modality batching fields that differ from ``batching``.
        gallery: The ``/v1/search`` gallery.
        label_templates: Prompt templates of zero-shot ``/v1/classify``; the label text
            embeddings are averaged over them.
        describe_max_len: Most tokens generated by ``/v1/describe``.
        describe_num_beams: Beam width of ``/v1/describe`` (1 = greedy).
        deployment_options: ``{deployment name: Deployment.options kwargs}`` (e.g.
            ``{"image_encoder": {"num_replicas": 2}}``) for Python callers of
            ``build_app``; with a serve YAML use its ``deployments:`` section instead
            (which Serve applies on top of these).
    """

    export_dir: str
    modalities: list[str] | None = None
    model_name: str = "omniray"
    quantization: Literal["none", "int8"] = "none"
    api_key: str | None = None
    torch_threads: int = Field(1, ge=1)
    limits: Limits = Field(default_factory=Limits)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    batching_overrides: dict[str, dict] = Field(default_factory=dict)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)
    label_templates: list[str] = Field(default_factory=lambda: ["{label}"])
    describe_max_len: int = Field(16, ge=1, le=256)
    describe_num_beams: int = Field(1, ge=1, le=8)
    deployment_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        unknown = sorted(set(v) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
        if not v:
            raise ValueError("modalities must not be empty")
        return list(dict.fromkeys(v))

    @field_validator("label_templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        if not v or any("{label}" not in t for t in v):
            raise ValueError("label_templates must be non-empty and each contain '{label}'")
        return v

    @model_validator(mode="after")
    def _check(self) -> OmniServeArgs:
        served = set(self.served_modalities)
        for m, over in self.batching_overrides.items():
            if m not in MODALITIES:
                raise ValueError(f"batching_overrides: unknown modality {m!r}")
            BatchingConfig.model_validate({**self.batching.model_dump(), **over})
        from serve.app import DEPLOYMENT_NAMES

        bad_names = sorted(set(self.deployment_options) - set(DEPLOYMENT_NAMES))
        if bad_names:
            raise ValueError(
                f"deployment_options: unknown deployments {bad_names}; known: {DEPLOYMENT_NAMES}"
            )
        if self.gallery.modalities is not None:
            bad = sorted(set(self.gallery.modalities) - served)
            if bad:
                raise ValueError(f"gallery.modalities {bad} are not served ({sorted(served)})")
        return self

    @property
    def served_modalities(self) -> list[str]:
        return list(self.modalities) if self.modalities is not None else list(MODALITIES)

    def batching_for(self, modality: str) -> BatchingConfig:
        """The batching config of ``modality`` (defaults merged with its override)."""
        over = self.batching_overrides.get(modality, {})
        return BatchingConfig.model_validate({**self.batching.model_dump(), **over})

    def resolved_api_key(self) -> str | None:
        """The API key, with ``env:NAME`` read from the environment."""
        if self.api_key and self.api_key.startswith("env:"):
            return os.environ.get(self.api_key[4:]) or None
        return self.api_key or None

    def with_absolute_paths(self) -> OmniServeArgs:
        """A copy whose paths are absolute, so replicas find them whatever their cwd."""
        gallery = self.gallery
        if gallery.split_dir:
            gallery = gallery.model_copy(
                update={"split_dir": str(Path(gallery.split_dir).expanduser().resolve())}
            )
        return self.model_copy(
            update={
                "export_dir": str(Path(self.export_dir).expanduser().resolve()),
                "gallery": gallery,
            }
        )
