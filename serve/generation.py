"""``POST /v1/generate``: any modality (or several, fused) -> image, audio, signal, point cloud.

Router side (:func:`generate_endpoint`): validate the request, turn its input into one
shared-space condition (the input modality's replica embeds a single input; several inputs
are fused by the fusion deployment), then hand the condition to the *target* modality's
replica, which holds that target's generation head (:mod:`models.generation`), samples with
dynamic batching (:class:`GenerationMixin`) and writes each sample back to a file with its
featurizer's writer (PNG, WAV, PLY, NPY/CSV).

Bad requests are 4xx in the OpenAI error shape: an unknown or unsupported target (422), the
target among the inputs (422), ``n``/``steps`` over the configured limits (413), undecodable
input (400, from the input's replica).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field
from ray import serve

from serve.errors import ApiError, error_value, raise_if_error
from serve.http import _Body


class GenerateRequest(_Body):
    """Body of ``POST /v1/generate``."""

    input: dict[str, Any]
    target: str
    n: int = Field(1, ge=1)
    seed: int | None = Field(0, ge=0, lt=2**62)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0.0, le=20.0)
    format: str | None = None
    model: str | None = None


def directions(inputs: list[str], targets: list[str]) -> list[dict[str, str]]:
    """Every ``{"input", "target"}`` direction: each served input modality (and ``fused``,
    several inputs at once) to each generation target other than itself."""
    out = [{"input": s, "target": t} for t in targets for s in inputs if s != t]
    out += [{"input": "fused", "target": t} for t in targets]
    return out


async def generate_endpoint(router: Any, request: Any) -> dict[str, Any]:
    """The body of the router's ``/v1/generate`` (see the module docstring).

    Args:
        router: The :class:`serve.router.Router` (limits, encoders, fusion, model info).
        request: The FastAPI request.
    """
    from serve.dispatch import deadline
    from serve.modalities import SPECS

    cfg = router.args.generation
    req: GenerateRequest = await router._read(request, GenerateRequest)
    targets = list(router.model_info.get("generation_targets", []))
    if req.target not in SPECS:
        raise ApiError(
            422,
            f"target: unknown modality {req.target!r}; generation targets: {targets}",
            "unknown_target",
            "target",
        )
    if req.target not in targets or req.target not in router.encoders:
        raise ApiError(
            422,
            f"target: this service cannot generate {req.target!r} "
            f"(generation targets served: {[t for t in targets if t in router.encoders]})",
            "unsupported_target",
            "target",
        )
    if req.target in req.input:
        raise ApiError(
            422,
            f"target {req.target!r} is one of the inputs: generation translates from other "
            "modalities",
            "target_is_input",
            "target",
        )
    if req.n > cfg.max_n:
        raise ApiError(413, f"n={req.n} exceeds max_n={cfg.max_n}", "too_large", "n")
    if req.steps is not None and req.steps > cfg.max_steps:
        raise ApiError(
            413, f"steps={req.steps} exceeds max_steps={cfg.max_steps}", "too_large", "steps"
        )
    items = router._sample(req.input, "input", single=False)
    seed = secrets.randbelow(2**31) if req.seed is None else int(req.seed)

    async def run() -> dict[str, Any]:
        if len(items) == 1:
            cond = (await router.encoders.embed(items[0]))["embed"]
        else:
            feats = await router.encoders.features(items)
            cond = (await router.fusion.fuse.remote(feats))["embedding"]
        return raise_if_error(
            await router.encoders.handles[req.target].generate.remote(
                np.asarray(cond, np.float32), req.n, seed, req.steps, req.guidance, req.format
            )
        )

    t0 = time.perf_counter()
    out = await deadline(run(), router.limits.request_timeout_s)
    return {
        "object": "list",
        "model": router.model_id,
        "target": req.target,
        "input_modalities": [it.modality for it in items],
        "data": out["data"],
        "usage": {
            "n": req.n,
            "steps": out["steps"],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
        },
    }


@dataclass
class _GenJob:
    cond: np.ndarray  # (E,)
    seeds: list[int]
    steps: int
    guidance: float | None


class GenerationMixin:
    """Generation in a modality replica (mixed into ``serve.replica.ModalityEncoder``):
    the target's head samples, dynamically batched across requests, and the featurizer's
    writer turns each sample into a file."""

    def _init_generation(self) -> None:
        cfg = self.args.generation
        self._gen_cfg = cfg
        self._generate_batched.set_max_batch_size(cfg.max_batch_size)
        self._generate_batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.counters.update({"generate_requests": 0, "generate_batches": 0, "generated": 0})

    def generation_info(self) -> dict[str, Any]:
        gen = dict(getattr(self.model.config, "generation", None) or {})
        return {
            "generation_targets": sorted(gen.get("targets", [])),
            "generation_steps": int(gen.get("steps", 0) or 0),
        }

    async def generate(
        self,
        cond: np.ndarray,
        n: int,
        seed: int,
        steps: int | None = None,
        guidance: float | None = None,
        fmt: str | None = None,
    ) -> dict[str, Any]:
        """``n`` samples of this modality for one shared-space condition.

        Returns:
            ``{"data": [{"index", "b64", "mime", "seed"}], "steps"}``, or an error value.
        """
        from pipelines.featurize.base import SampleError

        m = self.modality
        self.counters["generate_requests"] += 1
        if m not in self.model.generators:
            return error_value(422, f"no generation head for {m!r}", "unsupported_target", "target")
        formats = getattr(self.featurizer, "write_formats", ())
        if fmt is not None and fmt not in formats:
            return error_value(
                422, f"format must be one of {list(formats)} for {m}", "invalid_field", "format"
            )
        cond = np.asarray(cond, np.float32).reshape(-1)
        if cond.shape[0] != int(self.model.config.embed_dim) or not np.isfinite(cond).all():
            return error_value(422, "bad condition vector", "invalid_field", "input")
        steps = int(steps or self.model.generators[m].gen.steps)
        seeds = [int(seed) + i for i in range(int(n))]
        items = await self._generate_batched(_GenJob(cond, seeds, steps, guidance))
        loop = asyncio.get_running_loop()

        def write(item: np.ndarray, s: int) -> dict[str, Any]:
            w = self.featurizer.write(item, fmt)
            return {"b64": base64.b64encode(w.data).decode("ascii"), "mime": w.mime, "seed": s}

        try:
            files = await asyncio.gather(
                *[
                    loop.run_in_executor(self._prep_pool, write, it, s)
                    for it, s in zip(items, seeds, strict=True)
                ]
            )
        except SampleError as e:
            return error_value(422, f"cannot write {m}: {e}", "invalid_field", "format")
        self.counters["generated"] += len(files)
        return {
            "data": [{"index": i, **f} for i, f in enumerate(files)],
            "steps": steps,
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batched(self, jobs: list[_GenJob]) -> list[list[np.ndarray]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_pool, self._generate_forward, jobs)

    def _generate_forward(self, jobs: list[_GenJob]) -> list[list[np.ndarray]]:
        """Samples of several requests: one head call per (steps, guidance) group."""
        import torch

        self.counters["generate_batches"] += 1
        out: list[list[np.ndarray] | None] = [None] * len(jobs)
        groups: dict[tuple[int, float | None], list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.steps, j.guidance), []).append(i)
        for (steps, guidance), idx in groups.items():
            conds = torch.from_numpy(
                np.concatenate([np.repeat(jobs[i].cond[None], len(jobs[i].seeds), 0) for i in idx])
            )
            seeds = [s for i in idx for s in jobs[i].seeds]
            with torch.inference_mode():
                items = self.model.generate(
                    self.modality, conds, seeds, steps=steps, guidance=guidance
                )
            k = 0
            for i in idx:
                out[i] = items[k : k + len(jobs[i].seeds)]
                k += len(jobs[i].seeds)
        return out  # type: ignore[return-value]
