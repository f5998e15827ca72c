"""The per-modality deployment: one generic class, deployed once per modality.

``ModalityEncoder.options(name=encoder_name(m)).bind(m, args)`` holds only what modality
``m`` needs, loaded with the one export loader (``jobs.exports.load_export(dir,
modalities=[m], parts=[])``): its featurizer (``pipelines.featurize``, identical to training,
with the serve args' ``features`` overrides as input limits), its encoder branch through the
shared trunk and its projection. Requests are dynamically batched with ``@serve.batch``;
batches are bounded by cost (tokens, frames, points) as well as by count, through
``batch_size_fn``.

Threads: the event loop only queues; sniffing + featurization run in a small thread
pool and the model in a single-thread executor (torch releases the GIL), so featurizing the
next requests overlaps with the current batch's forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from serve.config import BatchingConfig, OmniServeArgs
from serve.errors import ApiError, error_value, sample_error_to_api
from serve.generation import GenerationMixin
from serve.modalities import RawInput, get_spec

logger = logging.getLogger("omniray.serve")


@dataclass
class _Job:
    """One featurized item waiting for a batch."""

    array: np.ndarray
    cost: int
    floor: float  # per-item share of max_batch_cost, so count is bounded too
    want_features: bool = False
    units: int = 1  # uncapped cost, reported as usage
    enqueued: float = field(default_factory=time.perf_counter)


def batch_cost(jobs: list[_Job]) -> int:
    """``batch_size_fn`` of ``@serve.batch``: the summed cost of a candidate batch.

    The batch's capacity is set to ``max_batch_cost``; a count bound ``max_batch_size`` is
    enforced by charging each item at least ``max_batch_cost / max_batch_size``.
    """
    if not jobs:
        return 0
    return max(sum(j.cost for j in jobs), math.ceil(len(jobs) * jobs[0].floor))


@serve.deployment(
    max_ongoing_requests=64,
    max_queued_requests=256,
    ray_actor_options={"num_cpus": 0.25},  # serve YAML sets real resources
    health_check_period_s=10,
)
class ModalityEncoder(GenerationMixin):
    """Serves one modality: featurize → (batched) encode → embedding / features; and, when
    the export has a generation head for it, ``/v1/generate`` into this modality.

    Args:
        modality: The modality this deployment serves.
        args: :class:`~serve.config.OmniServeArgs` (as a dict) of the application.
    """

    def __init__(self, modality: str, args: dict[str, Any]):
        import torch

        from serve.runtime import load_for_serving, resolve_templates

        self.args = OmniServeArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        self.modality = modality
        self.spec = get_spec(modality)
        ex = load_for_serving(
            self.args.export_dir,
            modalities=[modality],
            # Branch + trunk + temperature (+ this modality's generation head, if any).
            parts=["generate"],
            quantization=self.args.quantization,
            features=self.args.features,
        )
        self.model = ex.model
        self.featurizer = ex.featurizers[modality]
        self.templates = resolve_templates(ex, self.args.label_templates)
        # Heavy lazy imports (open3d ~1.5 s, decord) happen now, not in the first request.
        self.featurizer.warm_up()
        self._prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"prep-{modality}")
        self._model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{modality}")
        self.counters: dict[str, int] = {
            "requests": 0,
            "items": 0,
            "batches": 0,
            "batched_items": 0,
            "max_batch_items": 0,
            "dynamic_batches": 0,  # batches formed by @serve.batch (not the gallery's calls)
            "dynamic_items": 0,
            "max_dynamic_batch": 0,
            "errors": 0,
            "featurized_items": 0,
        }
        self._replica_id = f"{modality}-{os.getpid()}"
        self._metrics = _Metrics(modality)
        self._apply_batching(self.args.batching_for(modality))
        self._init_generation()
        logger.info(
            "%s replica ready (pid %d, quantization=%s, batching=%s)",
            modality,
            os.getpid(),
            self.args.quantization,
            self.batching.model_dump(),
        )

    # -- configuration ------------------------------------------------------------
    def _apply_batching(self, cfg: BatchingConfig) -> None:
        self.batching = cfg
        # Capacity of @serve.batch is the cost budget; batch_cost() bounds the count too.
        self._batched.set_max_batch_size(cfg.max_batch_cost)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config`` of the serve YAML: batching fields, applied without restart."""
        merged = {**self.batching.model_dump(), **(user_config or {}).get("batching", {})}
        self._apply_batching(BatchingConfig.model_validate(merged))

    # -- public methods (called through handles by the router) ----------------------
    async def embed(self, item: RawInput, want_features: bool = False) -> dict[str, Any]:
        """Featurizes and encodes one raw input.

        Args:
            item: A validated :class:`RawInput` of this modality.
            want_features: Also return the token features (for fusion / description).

        Returns:
            ``{"embed": (E,) float32}`` plus ``{"features": {"tokens": (N, d), "mask": (N,),
            "pooled": (d,), "embed": (E,)}}`` when asked; or an error value (never raises
            for bad input).
        """
        return (await self.embed_many([item], want_features))[0]

    async def embed_many(
        self, items: list[RawInput], want_features: bool = False
    ) -> list[dict[str, Any]]:
        """:meth:`embed` for several inputs of one request in one handle call.

        Each item still joins the dynamic batch on its own (so items of concurrent requests
        share forward passes); one call per request instead of per item saves the
        router→replica round trips.

        Returns:
            One result (or error value) per item, in order.
        """
        self.counters["requests"] += 1
        self.counters["items"] += len(items)
        for _ in items:
            self._metrics.request()
        loop = asyncio.get_running_loop()

        async def one(item: RawInput) -> dict[str, Any]:
            if item.modality != self.modality:
                self.counters["errors"] += 1
                return error_value(
                    422,
                    f"{item.param}: sent to the {self.modality} replica",
                    "wrong_modality",
                    item.param,
                )
            arr = await loop.run_in_executor(self._prep_pool, self._prepare, item)
            if isinstance(arr, dict):  # error value
                self.counters["errors"] += 1
                return arr
            job = self._job(arr, want_features)
            if self.batching.enabled:
                return await self._batched(job)
            out = await loop.run_in_executor(self._model_pool, self._forward, [job])
            return out[0]

        return list(await asyncio.gather(*[one(it) for it in items]))

    async def embed_featurized(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Encodes already-featurized items (the gallery, read from shards).

        Args:
            arrays: Featurized items (Contract 2 forms) of this modality.

        Returns:
            One (E,) float32 embedding per item.
        """
        self.counters["requests"] += 1
        self.counters["items"] += len(arrays)
        jobs = [self._job(a, False) for a in arrays]
        loop = asyncio.get_running_loop()
        outs = await loop.run_in_executor(self._model_pool, self._forward, jobs)
        return [o["embed"] for o in outs]

    def info(self) -> dict[str, Any]:
        """Static facts: modality, embedding size, temperature, zero-shot templates,
        quantization."""
        import torch

        cfg = self.model.config
        with torch.no_grad():
            # The same clamp as training's contrastive logits.
            logit_scale = min(float(self.model.logit_scale.exp()), float(cfg.max_logit_scale))
        return {
            "modality": self.modality,
            "embed_dim": int(cfg.embed_dim),
            "logit_scale": logit_scale,
            "templates": list(self.templates),
            "quantization": self.args.quantization,
            "batching": self.batching.model_dump(),
            "pid": os.getpid(),
            **self.generation_info(),
        }

    def stats(self) -> dict[str, Any]:
        """Per-replica counters (tests assert modality separation on these)."""
        import ray

        return {
            "modality": self.modality,
            "replica": self._replica_id,
            "actor_name": ray.get_runtime_context().get_actor_name(),
            **self.counters,
        }

    def check_health(self) -> None:
        """Serve health check: the model must still be loaded."""
        if self.model is None:
            raise RuntimeError("model not loaded")

    # -- internals ------------------------------------------------------------------
    def _job(self, arr: np.ndarray, want_features: bool) -> _Job:
        bc = self.batching
        units = self.spec.cost(arr)
        cost = min(units, bc.max_batch_cost)  # a costlier item runs alone, never fails
        return _Job(arr, cost, bc.max_batch_cost / bc.max_batch_size, want_features, units)

    def _prepare(self, item: RawInput) -> np.ndarray | dict[str, Any]:
        from pipelines.featurize import SampleError

        try:
            arr = self.spec.featurize(self.featurizer, item)
        except ApiError as e:
            return error_value(e.status, e.message, e.code, e.param)
        except SampleError as e:
            err = sample_error_to_api(e.reason, e.detail, item.param)
            return error_value(err.status, f"{item.param}: {err.message}", err.code, err.param)
        except Exception as e:  # noqa: BLE001 - a decoder bug on hostile bytes is bad input
            logger.warning("featurizer %s failed on %s: %r", self.modality, item.param, e)
            return error_value(
                400,
                f"{item.param}: could not decode {self.modality} input ({type(e).__name__})",
                "decode_error",
                item.param,
            )
        self.counters["featurized_items"] += 1
        return arr

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.01, batch_size_fn=batch_cost)
    async def _batched(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        self.counters["dynamic_batches"] += 1
        self.counters["dynamic_items"] += len(jobs)
        self.counters["max_dynamic_batch"] = max(self.counters["max_dynamic_batch"], len(jobs))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_pool, self._forward, jobs)

    def _forward(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """Runs the encoder on a batch (model thread).

        Returns:
            One dict per job (see :meth:`embed`).
        """
        import torch

        from models.data import collate
        from serve.runtime import to_numpy

        m = self.modality
        n = len(jobs)
        self.counters["batches"] += 1
        self.counters["batched_items"] += n
        self.counters["max_batch_items"] = max(self.counters["max_batch_items"], n)
        t0 = time.perf_counter()
        batch = collate([{m: j.array} for j in jobs], modalities=(m,))
        with torch.inference_mode():
            feats = self.model.encode_features(m, batch)
        embed = to_numpy(feats.embed)  # (B, E)
        outs: list[dict[str, Any]] = []
        need = any(j.want_features for j in jobs)
        if need:
            tokens = to_numpy(feats.tokens)  # (B, N, d)
            mask = to_numpy(feats.mask) if feats.mask is not None else None  # (B, N)
            pooled = to_numpy(feats.pooled)  # (B, d)
        for i, j in enumerate(jobs):
            out: dict[str, Any] = {"embed": embed[i], "units": j.units}
            if j.want_features:
                out["features"] = {
                    "tokens": tokens[i],
                    "mask": mask[i] if mask is not None else np.ones(tokens.shape[1], bool),
                    "pooled": pooled[i],
                    "embed": embed[i],
                }
            outs.append(out)
        self._metrics.batch(n, (time.perf_counter() - t0) * 1000)
        return outs


class _Metrics:
    """Custom Ray Serve metrics (exported with Ray's built-in ones on the metrics port).

    Serve adds the deployment/replica/application tags itself; we add ``modality``.
    """

    def __init__(self, modality: str):
        from ray.serve import metrics

        self.tags = {"modality": modality}
        self._requests = metrics.Counter(
            "omniray_modality_requests",
            description="Items received per modality.",
            tag_keys=("modality",),
        )
        self._batch_size = metrics.Histogram(
            "omniray_batch_items",
            description="Items per executed batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("modality",),
        )
        self._forward_ms = metrics.Histogram(
            "omniray_forward_ms",
            description="Encoder forward time per batch (ms).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
            tag_keys=("modality",),
        )

    def request(self) -> None:
        self._requests.inc(1, tags=self.tags)

    def batch(self, items: int, forward_ms: float) -> None:
        self._batch_size.observe(items, tags=self.tags)
        self._forward_ms.observe(forward_ms, tags=self.tags)
