"""Errors in one shape: every non-2xx answer is OpenAI's ``{"error": {"message", "type",
"param", "code"}}`` (``protocol.ErrorResponse``).

Routes raise ``APIError``; ``install`` registers the handlers that render it, pydantic's
validation errors (400 naming the field), the runtime's ``RequestError``/``SoftPromptError``
(400 with their one-line message) and anything unexpected (500, logged) in that shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from softprompt.runtime.prompts import SoftPromptError
from softprompt.runtime.requests import RequestError

from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines share its format


class APIError(HTTPException):
    """An error answer, rendered as OpenAI's error object. (An HTTPException, so FastAPI passes
    it through unchanged when it is raised while the body is read: the body limit.)"""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.type, self.param, self.code = type, param, code

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.detail, type=self.type, param=self.param, code=self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    """The one error shape, as a response."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_event(info: ErrorInfo) -> str:
    """The same shape as a server-sent event (an error after a stream has started)."""
    return f"data: {ErrorResponse(error=info).model_dump_json()}\n\n"


# pydantic names a union's members in an error's location; what they mean, in words
UNION_MEMBERS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                 "list[str]": "a list of strings", "list[int]": "a list of token ids (integers)",
                 "list[list[int]]": "a list of token-id lists",
                 "list[union[str,list[int]]]": "a list of strings or token-id lists"}


def _is_member(x) -> bool:
    return isinstance(x, str) and (x in UNION_MEMBERS or "[" in x)


def _union_message(errors: list[dict]) -> str | None:
    """For a value no member of a union accepts: ``field: expected A, B or C (got ...)``."""
    loc = [x for x in errors[0].get("loc", ()) if x != "body"]
    at = next((i for i, x in enumerate(loc) if _is_member(x)), None)
    if at is None:
        return None
    prefix, members = loc[:at], []
    for e in errors:
        other = [x for x in e.get("loc", ()) if x != "body"]
        if other[:at] == prefix and len(other) > at and _is_member(other[at]):
            name = UNION_MEMBERS.get(other[at], other[at])
            if name not in members:
                members.append(name)
    got = repr(errors[0].get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    expected = members[0] if len(members) == 1 else ", ".join(members[:-1]) + " or " + members[-1]
    return (f"{'.'.join(map(str, prefix))}: expected {expected}, got {got} (values are not "
            "converted)")


def validation_message(errors: list[dict]) -> tuple[str, str, str | None]:
    """(message, type, param) for the first pydantic error, naming the field."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON ({detail})", "invalid_request_error", None
    if kind == "extra_forbidden":
        return f"unknown field {field!r}", "invalid_request_error", loc[-1] if loc else None
    if kind == "missing":
        return f"missing required field {field!r}", "invalid_request_error", loc[0] if loc else None
    if field is None:
        return ("request body must be a JSON object sent with 'Content-Type: application/json'",
                "invalid_request_error", None)
    union = _union_message(errors)
    if union is not None:
        return union, "invalid_request_error", loc[0]
    got = repr(e.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{field}: {e.get('msg')} (got {got})", "invalid_request_error", loc[0] if loc else None


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc, APIError):
        return error_response(exc.status_code, exc.detail, exc.type, exc.param, exc.code,
                              exc.headers)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:  # no route matched: OpenAI's answer to an unknown URL
        return error_response(404, f"Invalid URL ({where})", code="unknown_url", headers=exc.headers)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow")
        return error_response(405, f"Method not allowed ({where})"
                              + (f"; allowed: {allow}" if allow else ""), code="method_not_allowed",
                              headers=exc.headers)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, *validation_message(list(exc.errors())))


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, str(exc))


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("softprompt: unhandled error on %s", request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def install(app: FastAPI) -> None:
    """Render every error ``app`` can raise in the one shape."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(RequestError, _bad_request)
    app.add_exception_handler(SoftPromptError, _bad_request)
    app.add_exception_handler(Exception, _internal)
