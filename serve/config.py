"""Typed arguments of the OmniRay Serve application (the ``args:`` section of a serve YAML).

Ray Serve's typed app-builder pattern: ``serve.app.build_app`` receives these fields either
as a plain dict (``serve run configs/serve/demo.yaml``, ``serve run serve.app:build_app
export_dir=...``) or as an :class:`OmniServeArgs`; pydantic validates them once, in the
driver, so a wrong key or type fails before any replica starts.

Replica counts, autoscaling, resources, ``max_ongoing_requests`` and ``max_queued_requests``
are *not* here: they belong to the ``deployments:`` section of the serve YAML (Ray Serve's
own schema), keyed by the names of :func:`deployment_names` (``router``, ``fusion`` and
``<modality>_encoder`` for every modality of the table in ``common/modalities.py``).

Input limits are *not* here either: they are the featurizer config of the export
(``data_config.yaml``'s ``features:``), which ``features`` may tighten per modality, so that
the service and the pipeline refuse oversized input with one set of limits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.modalities import MODALITIES

ROUTER_NAME = "router"
FUSION_NAME = "fusion"


def encoder_name(modality: str) -> str:
    """Deployment name of a modality's replicas (used in the serve YAML)."""
    return f"{modality}_encoder"


def deployment_names() -> tuple[str, ...]:
    """Every deployment name the app may contain (the serve YAML's ``deployments:`` keys),
    derived from the modality table."""
    return (ROUTER_NAME, FUSION_NAME, *(encoder_name(m) for m in MODALITIES))


class _Strict(BaseModel):
    # Unknown keys are an error (as in common.config): a typo must not be ignored silently.
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Service-level request limits; exceeding one gives HTTP 413 (503 for load), never a 5xx.

    Limits on one input's contents (pixels, seconds, frames, points, characters) are the
    featurizers' (``OmniServeArgs.features``), checked from the headers before decoding.

    Attributes:
        max_body_bytes: Largest accepted HTTP body (checked before JSON parsing).
        max_items: Most inputs in one ``/v1/embeddings`` request (and labels in classify).
        max_k: Largest ``k`` for ``/v1/search``.
        request_timeout_s: Router-side deadline of one request (503 when exceeded).
        max_inflight: Requests the router works on at once; more are refused with 503
            (the OpenAI error shape), so overload never grows memory without bound. A
            request takes its slot only once its whole body has arrived, so clients that
            send slowly hold no slot.
        body_timeout_s: Deadline for receiving one request's body; a slower sender is
            answered 408 and dropped.
        max_receiving_bytes: Bytes of bodies being received at once (they hold no
            in-flight slot yet); beyond it a request is refused with 503.
    """

    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_items: int = Field(64, ge=1)
    max_k: int = Field(100, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    max_inflight: int = Field(256, ge=1)
    body_timeout_s: float = Field(10.0, gt=0)
    max_receiving_bytes: int = Field(256 * 2**20, ge=1024)


class BatchingConfig(_Strict):
    """Dynamic batching of one modality deployment (``@serve.batch``).

    A batch closes when ``max_batch_size`` items are queued, when their summed cost (the
    length of each item's variable axis: tokens, frames, points; 1 for a fixed-shape item)
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


class GenerationServeConfig(_Strict):
    """Limits and batching of ``POST /v1/generate`` (in the target modality's replicas).

    Attributes:
        max_n: Most samples one request may ask for (more: 413).
        max_steps: Most ODE steps a request may ask for (more: 413); the default is the
            export's ``generation.steps``.
        max_batch_size: Most requests sampled together by one replica.
        batch_wait_timeout_s: How long the first request of a batch waits for company.
    """

    max_n: int = Field(8, ge=1, le=256)
    max_steps: int = Field(32, ge=1, le=1000)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)


class GalleryConfig(_Strict):
    """The retrieval gallery of ``/v1/search``: a prepared split embedded at start-up, or
    an embedding directory of ``python -m jobs.embed`` (any size its index handles).

    Attributes:
        split_dir: A prepared split (``DIR/test`` of Contract 2, Parquet shards), embedded
            by the modality replicas at start-up.
        embeddings_dir: An embedding directory of ``jobs.embed`` (its vectors and the index
            of ``jobs.index``), loaded as it is; it must come from the served export (same
            model revision and embedding size) or the service refuses to start. At most one
            of ``split_dir`` and ``embeddings_dir``; neither disables ``/v1/search`` (503
            with a clear message).
        modalities: Target modalities to index (default: every served modality present, or
            every modality of the embedding directory).
        max_items: Cap on indexed rows of a split (the first rows by id).
        chunk_size: Items per embedding call while building a split's index.
    """

    split_dir: str | None = None
    embeddings_dir: str | None = None
    modalities: list[str] | None = None
    max_items: int = Field(100_000, ge=1)
    chunk_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> GalleryConfig:
        if self.split_dir and self.embeddings_dir:
            raise ValueError("gallery: set split_dir or embeddings_dir, not both")
        return self


class OmniServeArgs(_Strict):
    """Arguments of :func:`serve.app.build_app`.

    Attributes:
        export_dir: Export directory of Contract 3 (``model.safetensors``,
            ``model_config.yaml``, ``tokenizer/``, ``data_config.yaml``).
        modalities: Modalities to serve; one deployment each. None = every branch of the
            export's model (resolved by ``build_app``).
        model_name: The id reported by ``/v1/models`` and accepted as ``model``.
        quantization: ``int8`` loads replicas with dynamically-quantized Linear layers.
        api_key: When set, every ``/v1/*`` request needs ``Authorization: Bearer <key>``.
            ``env:NAME`` reads it from the environment variable ``NAME``.
        torch_threads: Intra-op threads per replica (keep low: replicas share cores).
        limits: Service-level request limits.
        features: Overrides of the export's featurizer config (``data_config.yaml``'s
            ``features:``), deep-merged onto it, e.g. ``image: {max_pixels: 1000000}`` in YAML:
            the input limits of the service. They may tighten limits but not change what
            the model sees (a changed output shape is refused at start-up).
        batching: Default batching for every modality deployment.
        batching_overrides: Per-modality batching fields that differ from ``batching``.
        gallery: The ``/v1/search`` gallery.
        label_templates: Zero-shot prompt templates, used only when the export carries
            none (``zero_shot.yaml``; an export's own templates always win, so the service
            runs the classifier that evaluation measured).
        describe_max_len: Most tokens generated by ``/v1/describe``.
        describe_num_beams: Beam width of ``/v1/describe`` (1 = greedy).
        generation: Limits and batching of ``/v1/generate``.
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
    features: dict[str, Any] = Field(default_factory=dict)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    batching_overrides: dict[str, dict] = Field(default_factory=dict)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)
    label_templates: list[str] | None = None
    describe_max_len: int = Field(16, ge=1, le=256)
    describe_num_beams: int = Field(1, ge=1, le=8)
    generation: GenerationServeConfig = Field(default_factory=GenerationServeConfig)
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
    def _templates(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any("{label}" not in t for t in v)):
            raise ValueError("label_templates must be non-empty and each contain '{label}'")
        return v

    @model_validator(mode="after")
    def _check(self) -> OmniServeArgs:
        served = set(self.served_modalities)
        for m, over in self.batching_overrides.items():
            if m not in MODALITIES:
                raise ValueError(f"batching_overrides: unknown modality {m!r}")
            BatchingConfig.model_validate({**self.batching.model_dump(), **over})
        names = deployment_names()
        bad_names = sorted(set(self.deployment_options) - set(names))
        if bad_names:
            raise ValueError(
                f"deployment_options: unknown deployments {bad_names}; known: {list(names)}"
            )
        if self.features:
            from pipelines.config import FeatureConfig

            # Unknown modalities / fields / wrong types fail here, in the driver.
            FeatureConfig().with_overrides(self.features)
        if self.gallery.modalities is not None and not self.gallery.embeddings_dir:
            # A split's targets are embedded by the replicas; an embedding directory's
            # targets need no replica (only the query's modality must be served).
            bad = sorted(set(self.gallery.modalities) - served)
            if bad:
                raise ValueError(f"gallery.modalities {bad} are not served ({sorted(served)})")
        return self

    @property
    def served_modalities(self) -> list[str]:
        """``modalities``, or every modality of the table until ``build_app`` resolved it."""
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
        for key in ("split_dir", "embeddings_dir"):
            value = getattr(gallery, key)
            if value:
                gallery = gallery.model_copy(update={key: str(Path(value).expanduser().resolve())})
        return self.model_copy(
            update={
                "export_dir": str(Path(self.export_dir).expanduser().resolve()),
                "gallery": gallery,
            }
        )
