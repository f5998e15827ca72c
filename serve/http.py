"""HTTP plumbing of the router: the FastAPI app, request bodies, admission, errors, access log.

Guards, in order, for every ``/v1/*`` request: API key (401), body size (413), in-flight
limit (503) — :class:`Admission` — then JSON (400) and fields (422) — :func:`read_json` —
then each input's value (:func:`parse_sample`: 422 wrong type, 400 undecodable, 413 over the
body limit). Bad input is a 4xx in the OpenAI error shape, never a 5xx. One JSON
access-log line per request.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import Collection
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.config import Limits
from serve.errors import ApiError, error_body
from serve.modalities import SPECS, RawInput, get_spec

# Ray Serve routes the "ray.serve" logger to the replica log (JSON with encoding: JSON).
logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="OmniRay",
    description="Omni-modal embeddings, fusion, search, zero-shot classification, description.",
    version="0.1.0",
)


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


# -- middleware and error handlers ---------------------------------------------------
@app.middleware("http")
async def _access_log(request: Request, call_next):
    # Only logging here: the FastAPI app object is serialized into the replica, so
    # per-replica state (limits, key, in-flight count) lives in the Router's Admission.
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


# -- admission -----------------------------------------------------------------------
class Admission:
    """Per-router guards of every ``/v1/*`` request, with their counters.

    Args:
        limits: Service-level limits (body bytes, in-flight requests).
        api_key: Required bearer token, or None.
    """

    def __init__(self, limits: Limits, api_key: str | None):
        self.limits = limits
        self.api_key = api_key
        self.inflight = 0
        self.rejected = 0

    @contextlib.asynccontextmanager
    async def admit(self, request: Request):
        """API key (401), declared body size (413), in-flight limit (503, so overload is
        refused instead of queued without bound)."""
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


async def read_json(request: Request, model: type[BaseModel], limits: Limits, model_id: str) -> Any:
    """The request body validated as ``model``.

    Raises:
        ApiError: 413 over the body limit, 400 malformed JSON, 422 a wrong field or an
            unknown ``model`` id.
    """
    raw = await request.body()
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"body exceeds {limits.max_body_bytes} bytes", "too_large")
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
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise ApiError(
            422, f"{loc or 'body'}: {err.get('msg', 'invalid')}", "invalid_field", loc or None
        ) from None
    if getattr(req, "model", None) not in (None, model_id):
        raise ApiError(
            422,
            f"unknown model {req.model!r}; this service serves {model_id!r}",
            "model_not_found",
            "model",
        )
    return req


# -- inputs --------------------------------------------------------------------------
def parse_input(
    modality: str, value: Any, served: Collection[str], limits: Limits, param: str
) -> RawInput:
    """One ``{modality: value}`` entry -> :class:`RawInput` (router side, no decoding).

    Raises:
        ApiError: 422 for an unknown or unserved modality, else the spec's errors.
    """
    if modality not in SPECS:
        raise ApiError(
            422,
            f"{param}: unknown modality {modality!r}; known: {sorted(SPECS)}",
            "unknown_modality",
            param,
        )
    if modality not in served:
        raise ApiError(
            422,
            f"{param}: modality {modality!r} is not served here (served: {sorted(served)})",
            "modality_not_served",
            param,
        )
    return get_spec(modality).parse(value, limits, param)


def parse_sample(
    obj: dict[str, Any], served: Collection[str], limits: Limits, param: str, single: bool
) -> list[RawInput]:
    """A ``{modality: value, ...}`` sample -> one :class:`RawInput` per modality.

    Raises:
        ApiError: 422 for an empty sample, or several modalities where ``single``.
    """
    if not obj:
        raise ApiError(422, f"{param} must name at least one modality", "empty_input", param)
    if single and len(obj) != 1:
        raise ApiError(
            422,
            f"{param} must hold exactly one modality, got {sorted(obj)}",
            "one_modality",
            param,
        )
    return [parse_input(m, v, served, limits, f"{param}.{m}") for m, v in obj.items()]
