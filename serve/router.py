"""The router: FastAPI ingress implementing the HTTP API of Contract 5.

It validates and decodes requests (JSON, base64, sizes; no media decoding, no remote URLs),
dispatches each input only to the deployment of its modality (a text request never touches
the image replicas), and composes the answers: embeddings, gated fusion (via the fusion
deployment), gallery search (exact cosine, built at start-up), zero-shot classification
(cosine to label-prompt text embeddings) and description (the text decoder).

Guards, in order, for every ``/v1/*`` request: API key (401), body size (413), in-flight
limit (503), JSON (400), fields (422), limits (413), request timeout (503). Bad input is a
4xx in the OpenAI error shape, never a 5xx. One JSON access-log line per request.
"""

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from serve.config import OmniServeArgs
from serve.errors import ApiError, error_body, raise_if_error
from serve.gallery import Gallery, make_index, read_split
from serve.modalities import RawInput, get_spec
from serve.modalities.base import SPECS

# Ray Serve routes the "ray.serve" logger to the replica log (JSON with encoding: JSON).
logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="OmniRay",
    description="Omni-modal embeddings, fusion, search, zero-shot classification, description.",
    version="0.1.0",
)


#: Extra attempts of an encoder call whose replica died mid-request.
_REPLICA_RETRIES = 2


# -- request bodies ------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingsRequest(_Body):
    input: str | list[Any]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class FuseRequest(_Body):
    input: dict[str, Any]
    model: str | None = None


class SearchRequest(_Body):
    query: dict[str, Any]
    target: str
    k: int = Field(5, ge=1)
    model: str | None = None


class ClassifyRequest(_Body):
    input: dict[str, Any]
    labels: list[str] = Field(min_length=1)
    model: str | None = None


class DescribeRequest(_Body):
    input: dict[str, Any]
    max_len: int | None = Field(None, ge=1, le=256)
    num_beams: int | None = Field(None, ge=1, le=8)
    model: str | None = None


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc or 'body'}: {err.get('msg', 'invalid')}", loc or None


# -- middleware: access log ----------------------------------------------------------
@app.middleware("http")
async def _access_log(request: Request, call_next):
    # Only logging here: the FastAPI app object is serialized into the replica, so
    # per-replica state (limits, key, in-flight count) lives on the Router instance and
    # is enforced by Router._admit in each endpoint.
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        logger.info(
            json.dumps(
                {
                    "event": "access",
                    "method": request.method,
                    "path": request.url.path,
                    "status": status,
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
                    "client": request.client.host if request.client else None,
                }
            )
        )


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    loc = ".".join(str(p) for p in errs[0].get("loc", ())) if errs else ""
    msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
    return _error(422, f"{loc}: {msg}" if loc else msg, "invalid_field", loc or None)


@app.exception_handler(404)
async def _not_found(request: Request, _: Exception) -> JSONResponse:
    return _error(404, f"no route {request.method} {request.url.path}", "not_found")


@app.exception_handler(405)
async def _bad_method(request: Request, _: Exception) -> JSONResponse:
    return _error(
        405, f"method {request.method} not allowed on {request.url.path}", "method_not_allowed"
    )


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
        self.encoders = dict(encoders)
        self.fusion = fusion
        self.model_id = self.args.model_name
        self._label_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.started = time.time()
        # Facts of the model, asked once of any encoder (all share the embedding space).
        first = next(iter(self.encoders.values()))
        self.model_info = await first.info.remote()
        self.logit_scale = float(self.model_info["logit_scale"])
        self.galleries: dict[str, Gallery] = {}
        self.gallery_error: str | None = None
        if self.args.gallery.split_dir:
            await self._build_galleries()
        else:
            self.gallery_error = "no gallery configured (args.gallery.split_dir)"
        self.api_key = self.args.resolved_api_key()
        self.inflight = 0
        self.rejected = 0
        self.replica_retries = 0

    async def _build_galleries(self) -> None:
        g = self.args.gallery
        targets = g.modalities or list(self.encoders)
        t0 = time.perf_counter()
        items = await asyncio.to_thread(read_split, g.split_dir, targets, g.max_items)
        for m, it in items.items():
            handle = self.encoders[m]
            chunks = [
                it.arrays[i : i + g.chunk_size] for i in range(0, len(it.arrays), g.chunk_size)
            ]
            embeds: list[np.ndarray] = []
            for ch in chunks:
                embeds.extend(await handle.embed_featurized.remote(ch))
            index = make_index()
            index.add(np.stack(embeds))
            self.galleries[m] = Gallery(m, it.ids, it.labels, index)
        logger.info(
            json.dumps(
                {
                    "event": "gallery_built",
                    "split_dir": g.split_dir,
                    "sizes": {m: len(gal.ids) for m, gal in self.galleries.items()},
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
        )
        if not self.galleries:
            self.gallery_error = f"gallery split {g.split_dir} has none of {targets}"

    # -- helpers ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _admit(self, request: Request):
        """Guards of every ``/v1/*`` request: API key (401), declared body size (413),
        in-flight limit (503, so overload is refused instead of queued without bound)."""
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                raise ApiError(
                    401, "missing or invalid API key (Authorization: Bearer ...)", "invalid_api_key"
                )
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "invalid Content-Length header", "bad_request")
            if int(length) > self.limits.max_body_bytes:
                raise ApiError(
                    413, f"body of {length} bytes exceeds {self.limits.max_body_bytes}", "too_large"
                )
        if self.inflight >= self.limits.max_inflight:
            self.rejected += 1
            raise ApiError(
                503, "overloaded: too many requests in flight, retry later", "overloaded"
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def _json(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise ApiError(413, f"body exceeds {self.limits.max_body_bytes} bytes", "too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "JSON body nested too deeply", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(422, "body must be a JSON object", "wrong_type")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            msg, loc = _validation_message(e)
            raise ApiError(422, msg, "invalid_field", loc) from None
        if getattr(req, "model", None) not in (None, self.model_id):
            raise ApiError(
                422,
                f"unknown model {req.model!r}; this service serves {self.model_id!r}",
                "model_not_found",
                "model",
            )
        return req

    def _parse_one(self, modality: str, value: Any, param: str) -> RawInput:
        if modality not in SPECS:
            raise ApiError(
                422,
                f"{param}: unknown modality {modality!r}; known: {sorted(SPECS)}",
                "unknown_modality",
                param,
            )
        if modality not in self.encoders:
            raise ApiError(
                422,
                f"{param}: modality {modality!r} is not served here (served: "
                f"{sorted(self.encoders)})",
                "modality_not_served",
                param,
            )
        return get_spec(modality).parse(value, self.limits, param)

    def _parse_sample(self, obj: dict[str, Any], param: str, single: bool) -> list[RawInput]:
        if not obj:
            raise ApiError(422, f"{param} must name at least one modality", "empty_input", param)
        if single and len(obj) != 1:
            raise ApiError(
                422,
                f"{param} must hold exactly one modality, got {sorted(obj)}",
                "one_modality",
                param,
            )
        return [self._parse_one(m, v, f"{param}.{m}") for m, v in obj.items()]

    async def _embed(self, item: RawInput, want_features: bool = False) -> dict[str, Any]:
        return (await self._embed_many([item], want_features))[0]

    async def _embed_many(
        self, items: list[RawInput], want_features: bool = False
    ) -> list[dict[str, Any]]:
        """Embeds items of ONE modality with one call to its deployment.

        Raises:
            ApiError: The first item's error (4xx), or 503 when overloaded/unavailable.
        """
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        m = items[0].modality
        # Encoding is idempotent: a request caught on a replica that died (killed, OOM,
        # node lost) is retried on another one instead of failing the client.
        for attempt in range(_REPLICA_RETRIES + 1):
            try:
                outs = await self.encoders[m].embed_many.remote(items, want_features)
                return [raise_if_error(o) for o in outs]
            except BackPressureError:
                raise ApiError(
                    503, f"{m} replicas are overloaded, retry later", "overloaded"
                ) from None
            except DeploymentUnavailableError:
                raise ApiError(503, f"{m} deployment unavailable", "unavailable") from None
            except (RayActorError, ActorUnavailableError) as e:
                self.replica_retries += 1
                if attempt == _REPLICA_RETRIES:
                    raise ApiError(
                        503,
                        f"{m} replica lost ({type(e).__name__}), retry later",
                        "replica_unavailable",
                    ) from None
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _embed_all(
        self, items: list[RawInput], want_features: bool = False
    ) -> list[dict[str, Any]]:
        """Embeds items of any modalities: one call per modality, concurrently; results
        in the order of ``items``."""
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.modality, []).append(i)
        outs = await self._gather(
            [self._embed_many([items[i] for i in idx], want_features) for idx in groups.values()]
        )
        result: list[dict[str, Any]] = [{}] * len(items)
        for idx, out in zip(groups.values(), outs, strict=True):
            for i, o in zip(idx, out, strict=True):
                result[i] = o
        return result

    async def _gather(self, coros: list) -> list[Any]:
        """Runs coroutines concurrently; the first ApiError wins, the rest are cancelled."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def _deadline(self, coro) -> Any:
        try:
            return await asyncio.wait_for(coro, self.limits.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                503, f"request exceeded {self.limits.request_timeout_s} s", "timeout"
            ) from None

    async def _label_embeddings(self, labels: list[str]) -> np.ndarray:
        """(L, E) L2-normalized text embeddings of the labels, averaged over templates."""
        if "text" not in self.encoders:
            raise ApiError(
                422,
                "zero-shot classification needs the text modality, which is not served here",
                "modality_not_served",
                "labels",
            )
        missing = [lab for lab in dict.fromkeys(labels) if lab not in self._label_cache]
        if missing:
            prompts = [
                (lab, t.format(label=lab)) for lab in missing for t in self.args.label_templates
            ]
            outs = await self._embed_all(
                [self._parse_one("text", p, f"labels[{lab!r}]") for lab, p in prompts]
            )
            per: dict[str, list[np.ndarray]] = {}
            for (lab, _), o in zip(prompts, outs, strict=True):
                per.setdefault(lab, []).append(o["embed"])
            for lab, vs in per.items():
                v = np.mean(vs, axis=0)
                self._label_cache[lab] = v / max(float(np.linalg.norm(v)), 1e-12)
                while len(self._label_cache) > 4096:
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
            "inflight": self.inflight,
            "uptime_s": round(time.time() - self.started, 1),
        }

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        async with self._admit(request):
            return self._models()

    def _models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_id,
                    "object": "model",
                    "created": int(self.started),
                    "owned_by": "omniray",
                    "modalities": sorted(self.encoders),
                    "embedding_dim": self.model_info["embed_dim"],
                    "quantization": self.args.quantization,
                    "gallery": {m: len(g.ids) for m, g in self.galleries.items()},
                    "endpoints": [
                        "/v1/embeddings",
                        "/v1/fuse",
                        "/v1/search",
                        "/v1/classify",
                        "/v1/describe",
                    ],
                }
            ],
        }

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict[str, Any]:
        async with self._admit(request):
            return await self._embeddings(request)

    async def _embeddings(self, request: Request) -> dict[str, Any]:
        req: EmbeddingsRequest = await self._json(request, EmbeddingsRequest)
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
            if isinstance(v, str):
                items.append(self._parse_one("text", v, param))
            elif isinstance(v, dict):
                items.extend(self._parse_sample(v, param, single=True))
            else:
                raise ApiError(
                    422,
                    f"{param} must be a string or an object like "
                    '{"image": "<base64>"} (token-id inputs are not supported)',
                    "wrong_type",
                    param,
                )
        outs = await self._deadline(self._embed_all(items))
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
        n_tokens = int(
            sum(
                o.get("units", 0)
                for o, it in zip(outs, items, strict=True)
                if it.modality == "text"
            )
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
        async with self._admit(request):
            return await self._fuse(request)

    async def _fuse(self, request: Request) -> dict[str, Any]:
        req: FuseRequest = await self._json(request, FuseRequest)
        items = self._parse_sample(req.input, "input", single=False)

        async def run() -> dict[str, Any]:
            outs = await self._embed_all(items, want_features=True)
            feats = {it.modality: o["features"] for it, o in zip(items, outs, strict=True)}
            return await self.fusion.fuse.remote(feats)

        res = await self._deadline(run())
        return {
            "object": "fused_embedding",
            "model": self.model_id,
            "modalities": [it.modality for it in items],
            "embedding": np.asarray(res["embedding"], np.float32).tolist(),
            "gates": res["gates"],
        }

    @app.post("/v1/search")
    async def search(self, request: Request) -> dict[str, Any]:
        async with self._admit(request):
            return await self._search(request)

    async def _search(self, request: Request) -> dict[str, Any]:
        req: SearchRequest = await self._json(request, SearchRequest)
        if req.k > self.limits.max_k:
            raise ApiError(413, f"k={req.k} exceeds max_k={self.limits.max_k}", "too_large", "k")
        if not self.galleries:
            raise ApiError(503, f"search unavailable: {self.gallery_error}", "gallery_unavailable")
        if req.target not in self.galleries:
            raise ApiError(
                422,
                f"target {req.target!r} has no gallery; available: {sorted(self.galleries)}",
                "unknown_target",
                "target",
            )
        (item,) = self._parse_sample(req.query, "query", single=True)
        out = await self._deadline(self._embed(item))
        results = self.galleries[req.target].search(out["embed"], req.k)
        return {
            "object": "search_result",
            "model": self.model_id,
            "query_modality": item.modality,
            "target": req.target,
            "k": req.k,
            "results": results,
        }

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> dict[str, Any]:
        async with self._admit(request):
            return await self._classify(request)

    async def _classify(self, request: Request) -> dict[str, Any]:
        req: ClassifyRequest = await self._json(request, ClassifyRequest)
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
        (item,) = self._parse_sample(req.input, "input", single=True)

        async def run() -> tuple[dict[str, Any], np.ndarray]:
            return await self._gather([self._embed(item), self._label_embeddings(req.labels)])

        out, label_emb = await self._deadline(run())
        q = np.asarray(out["embed"], np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        sims = label_emb @ q  # (L,)
        logits = self.logit_scale * sims
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
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
        async with self._admit(request):
            return await self._describe(request)

    async def _describe(self, request: Request) -> dict[str, Any]:
        req: DescribeRequest = await self._json(request, DescribeRequest)
        items = self._parse_sample(req.input, "input", single=False)
        max_len = req.max_len or self.args.describe_max_len
        beams = req.num_beams or self.args.describe_num_beams

        async def run() -> dict[str, Any]:
            outs = await self._embed_all(items, want_features=True)
            feats = {it.modality: o["features"] for it, o in zip(items, outs, strict=True)}
            return await self.fusion.describe.remote(feats, max_len, beams)

        res = await self._deadline(run())
        return {
            "object": "description",
            "model": self.model_id,
            "modalities": [it.modality for it in items],
            "text": res["text"],
            "token_ids": res["token_ids"],
        }

    def stats(self) -> dict[str, Any]:
        """Router counters (in-flight and rejected requests)."""
        return {
            "inflight": self.inflight,
            "rejected": self.rejected,
            "replica_retries": self.replica_retries,
        }
