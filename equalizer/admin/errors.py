"""The admin API's one error shape, ``{"error": {"code", "message"}}``, and its refusals.

A handler raises ``ApiError``; the guard and Klein's error handlers write it with
``error_response``, so every refusal looks the same whoever refuses.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest


class ApiError(Exception):
    """A refusal with its HTTP status, machine-readable code and message for humans."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode("utf-8")


def error_response(request: IRequest, error: ApiError) -> bytes:
    return json_response(request, {"error": {"code": error.code, "message": error.message}},
                         error.status)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


NO_ENDPOINT = ApiError(404, "not_found", "no such endpoint")

STORE_UNAVAILABLE = ApiError(503, "store_unavailable", "the bucket store is unreachable")


def method_not_allowed(request: IRequest, allowed_methods: list[str] | None) -> ApiError:
    """405, naming the methods the path serves in ``Allow`` as well as in the message."""
    allowed = ", ".join(allowed_methods or ())
    request.setHeader(b"Allow", allowed.encode("ascii"))
    return ApiError(405, "method_not_allowed", f"allowed methods: {allowed}")
