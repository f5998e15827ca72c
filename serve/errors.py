"""Errors of the HTTP API in the OpenAI shape ``{"error": {"message", "type", "code"}}``.

Every failure a client can cause is an :class:`ApiError` with a 4xx status (Contract 5):
400 malformed or undecodable input, 401 missing/wrong API key, 413 over a configured limit,
422 a wrong field; 503 is overload or a timeout. Replicas never raise for bad input: they
return an error *value* (:func:`error_value`) that the router turns back into an
:class:`ApiError`, so a bad file can neither crash a replica nor surface as a 500.
"""

from __future__ import annotations

from typing import Any

#: HTTP status -> OpenAI error ``type``.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}

#: Featurizer ``SampleError.reason`` values that mean "over a limit" (413) not "bad" (400).
LIMIT_REASONS: frozenset[str] = frozenset({"too_large"})


class ApiError(Exception):
    """An error answered to the client with ``status`` and the OpenAI error body.

    Args:
        status: HTTP status code.
        message: Human-readable explanation (never a traceback).
        code: Machine-readable short code, e.g. ``"decode_error"``, ``"too_large"``.
        param: The offending request field, if any.
    """

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI-shaped error JSON body."""
    err: dict[str, Any] = {
        "message": message,
        "type": ERROR_TYPES.get(status, "invalid_request_error"),
        "code": code,
    }
    if param is not None:
        err["param"] = param
    return {"error": err}


def error_value(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """An error passed as a value from a replica to the router (no exception crosses Ray)."""
    return {"__error__": {"status": status, "message": message, "code": code, "param": param}}


def raise_if_error(value: Any) -> Any:
    """Re-raises an :func:`error_value` as :class:`ApiError`; passes other values through."""
    if isinstance(value, dict) and "__error__" in value:
        e = value["__error__"]
        raise ApiError(e["status"], e["message"], e["code"], e.get("param"))
    return value


def sample_error_to_api(reason: str, detail: str, param: str | None = None) -> ApiError:
    """Maps a featurizer ``SampleError(reason, detail)`` to 413 (limits) or 400 (bad input)."""
    status = 413 if reason in LIMIT_REASONS else 400
    return ApiError(status, f"{reason}: {detail}" if detail else reason, reason, param)
