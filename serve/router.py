"""The router: the endpoints of the HTTP API of Contract 5 (FastAPI ingress).

It validates requests (:mod:`serve.http`), dispatches each input only to the deployment of
its modality (:mod:`serve.dispatch`) and composes the answers: embeddings, gated fusion (via
the fusion deployment), gallery search (:mod:`serve.gallery`, built at start-up), zero-shot
classification (the one classifier of :mod:`models.zeroshot`, with the export's prompt
templates, so the service runs what evaluation measured) and description (the decoder).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations
# (``request: Request``) of the Serve-wrapped methods at run time.
import asyncio
import base64
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from fastapi import Request
from ray import serve

from serve.config import OmniServeArgs
from serve.dispatch import Encoders, deadline, gather
from serve.errors import ApiError
from serve.gallery import Gallery, build_galleries, load_embedding_galleries, search_galleries
from serve.generation import directions, generate_endpoint
from serve.http import (
    Admission,
    ClassifyRequest,
    DescribeRequest,
    EmbeddingsRequest,
    FuseRequest,
    SearchRequest,
    app,
    parse_input,
    parse_sample,
    read_json,
)
from serve.modalities import RawInput, language_modality

#: The API's endpoints, as listed by ``/v1/models``.
ENDPOINTS = [
    "/v1/embeddings",
    "/v1/fuse",
    "/v1/search",
    "/v1/classify",
    "/v1/describe",
    "/v1/generate",
]
#: ``/v1/search`` target that searches every gallery.
ANY_TARGET = "any"
#: Label classifier rows kept between requests.
_LABEL_CACHE_SIZE = 4096


@serve.deployment(
    max_ongoing_requests=512,
    max_queued_requests=256,
    ray_actor_options={"num_cpus": 0.1},  # serve YAML sets real resources
)
@serve.ingress(app)
class Router:
    """The ingress deployment.

    Args:
        args: :class:`~serve.config.OmniServeArgs` as a dict.
        encoders: ``{modality: DeploymentHandle}`` of the served modality deployments.
        fusion: Handle of the :class:`~serve.fusion.FusionHead` deployment.
    """

    async def __init__(self, args: dict[str, Any], encoders: dict[str, Any], fusion: Any):
        self.args = OmniServeArgs.model_validate(args)
        self.limits = self.args.limits
        self.encoders = Encoders(encoders)
        self.fusion = fusion
        self.model_id = self.args.model_name
        self.language = language_modality()
        self.started = time.time()
        self.admission = Admission(self.limits, self.args.resolved_api_key())
        # Facts of the model, asked once of any encoder (all load the same export).
        self.model_info = await next(iter(encoders.values())).info.remote()
        self.logit_scale = float(self.model_info["logit_scale"])
        self.templates: list[str] = list(self.model_info["templates"])
        self._label_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.galleries: dict[str, Gallery] = {}
        self.gallery_error: str | None = (
            "no gallery configured (args.gallery.split_dir or args.gallery.embeddings_dir)"
        )
        g = self.args.gallery
        if g.split_dir:
            targets = g.modalities or list(encoders)
            self.galleries = await build_galleries(
                g.split_dir, targets, encoders, max_items=g.max_items, chunk_size=g.chunk_size
            )
            self.gallery_error = None if self.galleries else f"{g.split_dir} has none of {targets}"
        elif g.embeddings_dir:
            # Checked against the export (revision, size) in build_app; loaded as it is.
            self.galleries = await asyncio.to_thread(
                load_embedding_galleries, g.embeddings_dir, g.modalities
            )
            self.gallery_error = None

    # -- helpers ------------------------------------------------------------------------
    async def _read(self, request: Request, model: type) -> Any:
        return await read_json(request, model, self.limits, self.model_id)

    def _sample(self, obj: dict[str, Any], param: str, single: bool) -> list[RawInput]:
        return parse_sample(obj, self.encoders, self.limits, param, single)

    async def _label_classifier(self, labels: list[str]) -> np.ndarray:
        """(L, E) zero-shot class embeddings of ``labels`` (cached per label): the
        classifier of :func:`models.zeroshot.zero_shot_classifier`, its prompts embedded
        asynchronously by the language modality's replicas."""
        from models.zeroshot import class_embeddings, template_prompts

        lang = self.language
        if lang is None or lang not in self.encoders:
            raise ApiError(
                422,
                "zero-shot classification needs the language modality, not served here",
                "modality_not_served",
                "labels",
            )
        missing = [lab for lab in dict.fromkeys(labels) if lab not in self._label_cache]
        if missing:
            prompts = template_prompts(missing, self.templates)
            items = [parse_input(lang, p, self.encoders, self.limits, "labels") for p in prompts]
            outs = await self.encoders.embed_all(items)
            rows = class_embeddings(np.stack([o["embed"] for o in outs]), len(missing)).numpy()
            for lab, row in zip(missing, rows, strict=True):
                self._label_cache[lab] = row
                while len(self._label_cache) > _LABEL_CACHE_SIZE:
                    self._label_cache.popitem(last=False)
        return np.stack([self._label_cache[lab] for lab in labels])

    # -- endpoints ----------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_id,
            "modalities": sorted(self.encoders),
            "gallery": {m: len(g.ids) for m, g in self.galleries.items()},
            "inflight": self.admission.inflight,
            "uptime_s": round(time.time() - self.started, 1),
        }

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        async with self.admission.admit(request):
            info = {
                "id": self.model_id,
                "object": "model",
                "created": int(self.started),
                "owned_by": "omniray",
                "modalities": sorted(self.encoders),
                "embedding_dim": self.model_info["embed_dim"],
                "quantization": self.args.quantization,
                "gallery": {m: len(g.ids) for m, g in self.galleries.items()},
                "zero_shot_templates": self.templates,
                "endpoints": ENDPOINTS,
                "generation": directions(
                    sorted(self.encoders),
                    [
                        t
                        for t in self.model_info.get("generation_targets", [])
                        if t in self.encoders
                    ],
                ),
            }
            return {"object": "list", "data": [info]}

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict[str, Any]:
        async with self.admission.admit(request):
            return await self._embeddings(request)

    async def _embeddings(self, request: Request) -> dict[str, Any]:
        req: EmbeddingsRequest = await self._read(request, EmbeddingsRequest)
        values = [req.input] if isinstance(req.input, str) else req.input
        if not values:
            raise ApiError(422, "input must not be empty", "empty_input", "input")
        if len(values) > self.limits.max_items:
            raise ApiError(
                413,
                f"{len(values)} inputs exceed max_items={self.limits.max_items}",
                "too_many_items",
                "input",
            )
        items: list[RawInput] = []
        for i, v in enumerate(values):
            param = f"input[{i}]"
            if isinstance(v, str) and self.language is not None:
                items.append(parse_input(self.language, v, self.encoders, self.limits, param))
            elif isinstance(v, dict):
                items.extend(self._sample(v, param, single=True))
            else:
                raise ApiError(
                    422,
                    f"{param} must be a string or an object like "
                    '{"<modality>": <value>} (token-id inputs are not supported)',
                    "wrong_type",
                    param,
                )
        outs = await deadline(self.encoders.embed_all(items), self.limits.request_timeout_s)
        data = []
        for i, o in enumerate(outs):
            vec = np.asarray(o["embed"], dtype=np.float32)
            if req.dimensions is not None:
                if req.dimensions > vec.shape[0]:
                    raise ApiError(
                        422, f"dimensions must be <= {vec.shape[0]}", "invalid_field", "dimensions"
                    )
                # Matryoshka-style truncation + re-normalization (as OpenAI's v3 models).
                vec = vec[: req.dimensions]
                vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
            emb: Any = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
                if req.encoding_format == "base64"
                else vec.tolist()
            )
            data.append(
                {"object": "embedding", "index": i, "embedding": emb, "modality": items[i].modality}
            )
        n_tokens = sum(
            int(o.get("units", 0))
            for o, it in zip(outs, items, strict=True)
            if it.modality == self.language
        )
        counts: dict[str, int] = {}
        for it in items:
            counts[it.modality] = counts.get(it.modality, 0) + 1
        return {
            "object": "list",
            "data": data,
            "model": self.model_id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "inputs": counts},
        }

    @app.post("/v1/fuse")
    async def fuse(self, request: Request) -> dict[str, Any]:
        async with self.admission.admit(request):
            req: FuseRequest = await self._read(request, FuseRequest)
            items = self._sample(req.input, "input", single=False)

            async def run() -> dict[str, Any]:
                return await self.fusion.fuse.remote(await self.encoders.features(items))

            res = await deadline(run(), self.limits.request_timeout_s)
            return {
                "object": "fused_embedding",
                "model": self.model_id,
                "modalities": [it.modality for it in items],
                "embedding": np.asarray(res["embedding"], np.float32).tolist(),
                "gates": res["gates"],
            }

    @app.post("/v1/search")
    async def search(self, request: Request) -> dict[str, Any]:
        async with self.admission.admit(request):
            req: SearchRequest = await self._read(request, SearchRequest)
            if req.k > self.limits.max_k:
                raise ApiError(
                    413, f"k={req.k} exceeds max_k={self.limits.max_k}", "too_large", "k"
                )
            if not self.galleries:
                raise ApiError(
                    503, f"search unavailable: {self.gallery_error}", "gallery_unavailable"
                )
            if req.target != ANY_TARGET and req.target not in self.galleries:
                raise ApiError(
                    422,
                    f"target {req.target!r} has no gallery; available: "
                    f"{sorted(self.galleries)} or {ANY_TARGET!r}",
                    "unknown_target",
                    "target",
                )
            targets = sorted(self.galleries) if req.target == ANY_TARGET else [req.target]
            (item,) = self._sample(req.query, "query", single=True)
            out = await deadline(self.encoders.embed(item), self.limits.request_timeout_s)
            return {
                "object": "search_result",
                "model": self.model_id,
                "query_modality": item.modality,
                "target": req.target,
                "k": req.k,
                "results": search_galleries(self.galleries, targets, out["embed"], req.k),
            }

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> dict[str, Any]:
        async with self.admission.admit(request):
            return await self._classify(request)

    async def _classify(self, request: Request) -> dict[str, Any]:
        from models.zeroshot import zero_shot_scores

        req: ClassifyRequest = await self._read(request, ClassifyRequest)
        if len(req.labels) > self.limits.max_items:
            raise ApiError(
                413,
                f"{len(req.labels)} labels exceed {self.limits.max_items}",
                "too_many_items",
                "labels",
            )
        if len(set(req.labels)) != len(req.labels) or any(not lab.strip() for lab in req.labels):
            raise ApiError(
                422, "labels must be unique non-empty strings", "invalid_field", "labels"
            )
        (item,) = self._sample(req.input, "input", single=True)
        out, classifier = await deadline(
            gather([self.encoders.embed(item), self._label_classifier(req.labels)]),
            self.limits.request_timeout_s,
        )
        q = np.asarray(out["embed"], np.float32)  # (E,)
        sims = zero_shot_scores(q, classifier).numpy()  # (L,) cosine
        probs = zero_shot_scores(q, classifier, self.logit_scale).numpy()  # (L,)
        order = np.argsort(-probs, kind="stable")
        return {
            "object": "classification",
            "model": self.model_id,
            "input_modality": item.modality,
            "label": req.labels[int(order[0])],
            "scores": [
                {"label": req.labels[i], "score": float(sims[i]), "probability": float(probs[i])}
                for i in order.tolist()
            ],
        }

    @app.post("/v1/describe")
    async def describe(self, request: Request) -> dict[str, Any]:
        async with self.admission.admit(request):
            req: DescribeRequest = await self._read(request, DescribeRequest)
            items = self._sample(req.input, "input", single=False)
            max_len = req.max_len or self.args.describe_max_len
            beams = req.num_beams or self.args.describe_num_beams

            async def run() -> dict[str, Any]:
                feats = await self.encoders.features(items)
                return await self.fusion.describe.remote(feats, max_len, beams)

            res = await deadline(run(), self.limits.request_timeout_s)
            return {
                "object": "description",
                "model": self.model_id,
                "modalities": [it.modality for it in items],
                "text": res["text"],
                "token_ids": res["token_ids"],
            }

    @app.post("/v1/generate")
    async def generate(self, request: Request) -> dict[str, Any]:
        async with self.admission.admit(request):
            return await generate_endpoint(self, request)

    def stats(self) -> dict[str, Any]:
        """Router counters (in-flight and rejected requests, replica retries)."""
        return {
            "inflight": self.admission.inflight,
            "rejected": self.admission.rejected,
            "replica_retries": self.encoders.replica_retries,
            "replica_deaths": self.encoders.replica_deaths,
            "receiving": self.admission.receiving,
            "slow_dropped": self.admission.slow_dropped,
        }
