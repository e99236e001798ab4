"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Handlers raise ``APIError`` (or one of the helpers below); the app turns it, and every other
error a request can meet (an unknown route, a wrong method, an exception inside a handler),
into this JSON body, so a client written for OpenAI or vLLM reads every failure the same way.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["APIError", "bad_request", "error_body", "not_found", "overloaded", "unauthorized"]

# status -> OpenAI's error "type"
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(
    message: str, status: int, param: Optional[str] = None, code: Optional[str] = None
) -> dict[str, dict[str, Any]]:
    """The JSON body of an error response."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class APIError(Exception):
    """An error a handler answers with: HTTP ``status``, message, offending ``param``, ``code``,
    and extra response ``headers`` (``Retry-After`` on 503)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the link to the HTTP front process whole
        return (type(self), (self.status, self.message, self.param, self.code, self.headers))

    def body(self) -> dict[str, dict[str, Any]]:
        return error_body(self.message, self.status, self.param, self.code)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


def not_found(message: str, code: Optional[str] = None) -> APIError:
    return APIError(404, message, None, code)


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(retry_after)})
