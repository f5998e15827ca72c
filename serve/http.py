"""HTTP plumbing of the router: the FastAPI app, request bodies, admission, errors, access log.

Guards, in order, for every ``/v1/*`` request — :class:`Admission`: API key (401),
declared body size (413), the body itself, received under its own deadline (408) and size
limit (413), and only then an in-flight slot (503); so a client that sends slowly holds no
slot and cannot starve the others. Then :func:`read_json`: JSON (400; numbers too long to
parse, lone surrogates), bounds checked before the schema library sees the body (unknown
keys 422, lists over ``max_items`` 413: pydantic would build one error per item), fields
(422); then each input's value (:func:`parse_sample`: 422 wrong type, 400 undecodable, 413
over a limit). Bad input is a 4xx in the OpenAI error shape, never a 5xx.

Answers are rendered by :class:`SafeJSONResponse` (ASCII JSON, non-finite floats as null),
so no string a client sent can make the encoder fail, and a client string quoted in an
error message goes through :func:`echo` (escaped, truncated). Undecodable header bytes
fail inside Ray Serve's proxy before this app runs: :mod:`serve.proxy_guard` shields them.
One JSON access-log line per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
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


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class SafeJSONResponse(JSONResponse):
    """JSON that no content can make fail: ASCII only (a lone surrogate or any other
    character becomes a ``\\uXXXX`` escape, never an encoding error) and non-finite floats
    as ``null``."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        except ValueError:
            text = json.dumps(_finite(content), ensure_ascii=True, separators=(",", ":"))
        return text.encode("ascii")


def echo(value: Any, limit: int = 40) -> str:
    """A client-sent value quoted safely in a message: escaped (``ascii``) and truncated."""
    text = value if isinstance(value, str) else str(value)
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


app = FastAPI(
    title="OmniRay",
    description="Omni-modal embeddings, fusion, search, zero-shot classification, description.",
    version="0.1.0",
    default_response_class=SafeJSONResponse,
)


# -- request bodies ------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: Longest ``model`` / ``user`` / ``target`` string accepted (they are echoed in messages).
_NAME_CHARS = 256


class EmbeddingsRequest(_Body):
    input: str | list[Any]
    model: str | None = Field(None, max_length=_NAME_CHARS)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=_NAME_CHARS)


class FuseRequest(_Body):
    input: dict[str, Any]
    model: str | None = Field(None, max_length=_NAME_CHARS)


class SearchRequest(_Body):
    query: dict[str, Any]
    target: str = Field(max_length=64)
    k: int = Field(5, ge=1)
    model: str | None = Field(None, max_length=_NAME_CHARS)


class ClassifyRequest(_Body):
    input: dict[str, Any]
    labels: list[str] = Field(min_length=1)
    model: str | None = Field(None, max_length=_NAME_CHARS)


class DescribeRequest(_Body):
    input: dict[str, Any]
    max_len: int | None = Field(None, ge=1, le=256)
    num_beams: int | None = Field(None, ge=1, le=8)
    model: str | None = Field(None, max_length=_NAME_CHARS)


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
    return SafeJSONResponse(error_body(status, message, code, param), status_code=status)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return SafeJSONResponse(e.body(), status_code=e.status)


def _loc(err: dict[str, Any]) -> str:
    return ".".join(echo(p, 40)[1:-1] if isinstance(p, str) else str(p) for p in err["loc"])


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    loc = _loc(errs[0]) if errs and errs[0].get("loc") else ""
    msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
    return _error(422, f"{loc}: {msg}" if loc else msg, "invalid_field", loc or None)


@app.exception_handler(404)
async def _not_found(request: Request, _: Exception) -> JSONResponse:
    return _error(404, f"no route {request.method} {echo(request.url.path, 80)}", "not_found")


@app.exception_handler(405)
async def _bad_method(request: Request, _: Exception) -> JSONResponse:
    return _error(
        405,
        f"method {echo(request.method)} not allowed on {echo(request.url.path, 80)}",
        "method_not_allowed",
    )


# -- admission -----------------------------------------------------------------------
class Admission:
    """Per-router guards of every ``/v1/*`` request, with their counters.

    Args:
        limits: Service-level limits (body bytes, body deadline, in-flight requests).
        api_key: Required bearer token, or None.
    """

    def __init__(self, limits: Limits, api_key: str | None):
        self.limits = limits
        self.api_key = api_key
        self.inflight = 0
        self.rejected = 0
        self.receiving = 0  # requests whose body is being received (they hold no slot)
        self.buffered = 0  # bytes of bodies being received
        self.slow_dropped = 0  # bodies not received within limits.body_timeout_s

    @contextlib.asynccontextmanager
    async def admit(self, request: Request):
        """API key (401), declared body size (413), the body within its deadline (408) and
        size (413), then the in-flight limit (503, so overload is refused instead of queued
        without bound). The body is kept on the request (``await request.body()``)."""
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(
                given.encode("utf-8", "replace"), self.api_key.encode()
            ):
                raise ApiError(
                    401, "missing or invalid API key (Authorization: Bearer ...)", "invalid_api_key"
                )
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit() and len(length) <= 18):
                raise ApiError(400, "invalid Content-Length header", "bad_request")
            if int(length) > self.limits.max_body_bytes:
                raise ApiError(
                    413, f"body of {length} bytes exceeds {self.limits.max_body_bytes}", "too_large"
                )
        if request.method in ("POST", "PUT", "PATCH"):
            await self._receive(request)
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

    async def _receive(self, request: Request) -> None:
        """Reads the whole body under ``body_timeout_s`` and ``max_body_bytes``; bodies in
        reception together hold at most ``max_receiving_bytes`` (503 beyond)."""
        lim = self.limits
        budget = lim.max_receiving_bytes
        chunks: list[bytes] = []
        got = 0

        async def pull() -> None:
            nonlocal got
            async for chunk in request.stream():
                if not chunk:
                    continue
                got += len(chunk)
                self.buffered += len(chunk)
                if got > lim.max_body_bytes:
                    raise ApiError(413, f"body exceeds {lim.max_body_bytes} bytes", "too_large")
                if self.buffered > budget:
                    self.rejected += 1
                    raise ApiError(
                        503, "overloaded: too many bodies in reception, retry later", "overloaded"
                    )
                chunks.append(chunk)

        self.receiving += 1
        try:
            await asyncio.wait_for(pull(), lim.body_timeout_s)
        except TimeoutError:
            self.slow_dropped += 1
            raise ApiError(
                408,
                f"request body not received within {lim.body_timeout_s:g} s",
                "body_timeout",
            ) from None
        finally:
            self.receiving -= 1
            self.buffered -= got
        # Starlette's Request.body() returns this cached body from now on.
        request._body = b"".join(chunks)


#: A JSON string escape of a UTF-16 surrogate: the only way a JSON text can make a
#: Python string that is not valid Unicode (a lone surrogate).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _bound(data: dict[str, Any], model: type[BaseModel], limits: Limits) -> None:
    """Checks that are cheap whatever the body holds, before pydantic validates it (which
    builds one error object per bad key or list item: a million of them for a few MB)."""
    unknown = [k for k in data if k not in model.model_fields]
    if unknown:
        shown = ", ".join(echo(k) for k in unknown[:3])
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ApiError(
            422, f"unknown field(s) {shown}{more}", "invalid_field", echo(unknown[0])[1:-1]
        )
    for name, value in data.items():
        if isinstance(value, list) and len(value) > limits.max_items:
            raise ApiError(
                413,
                f"{name}: {len(value)} items exceed max_items={limits.max_items}",
                "too_many_items",
                name,
            )
        if isinstance(value, dict) and len(value) > max(len(SPECS), 1):
            raise ApiError(
                422,
                f"{name}: {len(value)} keys, more than there are modalities ({len(SPECS)})",
                "invalid_field",
                name,
            )


async def read_json(request: Request, model: type[BaseModel], limits: Limits, model_id: str) -> Any:
    """The request body validated as ``model``.

    Raises:
        ApiError: 413 over the body limit or ``max_items``, 400 malformed JSON (numbers
            too long to parse, lone surrogates included), 422 a wrong or unknown field or an
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
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ApiError(400, f"JSON number out of range: {str(e)[:120]}", "invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, "the body contains a lone UTF-16 surrogate (\\ud800-\\udfff)", "invalid_json"
            ) from None
    if not isinstance(data, dict):
        raise ApiError(422, "body must be a JSON object", "wrong_type")
    _bound(data, model, limits)
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc = _loc(err) if err.get("loc") else ""
        raise ApiError(
            422, f"{loc or 'body'}: {err.get('msg', 'invalid')}", "invalid_field", loc or None
        ) from None
    if getattr(req, "model", None) not in (None, model_id):
        raise ApiError(
            422,
            f"unknown model {echo(req.model)}; this service serves {model_id!r}",
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
            f"{param}: unknown modality {echo(modality)}; known: {sorted(SPECS)}",
            "unknown_modality",
            param,
        )
    if modality not in served:
        raise ApiError(
            422,
            f"{param}: modality {echo(modality)} is not served here (served: {sorted(served)})",
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
    if len(obj) > len(SPECS):
        raise ApiError(
            422, f"{param}: {len(obj)} keys, more than there are modalities", "invalid_field", param
        )
    if single and len(obj) != 1:
        raise ApiError(
            422,
            f"{param} must hold exactly one modality, got [{', '.join(echo(k) for k in obj)}]",
            "one_modality",
            param,
        )
    return [parse_input(m, v, served, limits, f"{param}.{m}") for m, v in obj.items()]
