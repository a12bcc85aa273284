"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from tunesmith.errors import ServiceError


def not_found(kind: str, ident: str, param: str | None = None) -> ServiceError:
    # Another org's objects answer exactly like missing ones: their existence is not revealed.
    return ServiceError(f"No such {kind}: '{ident}'", status=404, code=f"{kind}_not_found",
                        param=param)


def bad_request(message: str, *, param: str | None = None, code: str | None = None
                ) -> ServiceError:
    return ServiceError(message, status=400, code=code, param=param)


def conflict(message: str, *, code: str) -> ServiceError:
    return ServiceError(message, status=409, code=code)


def error_body(message: str, *, status: int, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_headers(status: int) -> dict[str, str]:
    # The openai client retries 409 and 5xx by default; a state conflict will not go away.
    return {"x-should-retry": "false"} if status == 409 else {}
