"""A shield in front of Ray Serve's HTTP proxy for requests it cannot parse.

Ray Serve's proxy decodes every request header name and value as UTF-8 (to look for its own
``serve_multiplexed_model_id`` / session / request-id headers) before it routes the request
to any application. A header value holding bytes that are not UTF-8 (HTTP allows any
``obs-text`` byte there) raises ``UnicodeDecodeError`` inside the proxy, which answers a
plain-text 500 — the router never sees the request. (Ray 2.60:
``ray/serve/_private/proxy.py``, ``HTTPProxy.setup_request_context_and_handle``.)

:class:`HeaderGuard` is a pure ASGI middleware that runs in the proxy, before that code, and
answers such a request 400 in the OpenAI error shape. Ray Serve loads proxy middlewares
from the import path in the environment variable ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(read by the proxy process at start-up, so it must be set in the environment of the Ray
node — ``ray start`` / ``ray.init`` — not only in the driver)::

    export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_guard:proxy_middlewares
    ray start --head ...   # or: serve run configs/serve/demo.yaml (starts Ray itself)

This module imports nothing heavy: the proxy imports it.
"""

from __future__ import annotations

import json
from typing import Any

#: Environment variable through which Ray Serve's proxy loads :func:`proxy_middlewares`.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
#: Its value for this module.
PROXY_CALLBACK_PATH = "serve.proxy_guard:proxy_middlewares"


def _bad_request(message: str) -> tuple[dict[str, Any], bytes]:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "code": "bad_header"}}
    ).encode("ascii")
    start = {
        "type": "http.response.start",
        "status": 400,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, body


def undecodable_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The name of the first header whose name or value is not UTF-8, else None."""
    for name, value in headers:
        try:
            name.decode("utf-8")
            value.decode("utf-8")
        except UnicodeDecodeError:
            return name.decode("latin-1")[:40]
    return None


class HeaderGuard:
    """ASGI middleware: a request with a non-UTF-8 header (or path) gets 400, not the
    proxy's 500."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            bad = undecodable_header(scope.get("headers") or [])
            raw_path = scope.get("raw_path") or b""
            if bad is None and isinstance(raw_path, bytes):
                try:
                    raw_path.decode("utf-8")
                except UnicodeDecodeError:
                    bad = "request path"
            if bad is not None:
                start, body = _bad_request(f"header {bad!a} is not valid UTF-8")
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def proxy_middlewares() -> list[Any]:
    """The middlewares Ray Serve's proxy applies (see the module docstring)."""
    from starlette.middleware import Middleware

    return [Middleware(HeaderGuard)]
