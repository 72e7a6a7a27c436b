"""Every error leaves tokenrelay in OpenAI's shape: ``{"error": {"message", "type", ...}}``.

FastAPI's own validation errors are rewritten into messages a user can act on (which parameter,
what was expected); nothing ever carries the text of an internal exception.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from tokenrelay.errors import InvalidRequest, TokenrelayError

__all__ = ["INTERNAL_ERROR", "error_response", "install_error_handlers", "validation_message"]

INTERNAL_ERROR = "The server had an error processing your request."

logger = logging.getLogger(__name__)

_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "string": "a string",
    "str": "a string",
    "list": "an array",
    "dict": "an object",
    "model": "an object",
    "literal": "one of the allowed values",
}


# The names pydantic puts in an error's location for the member of a union it tried.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def error_response(exc: TokenrelayError) -> Response:
    return Response(
        orjson.dumps(exc.to_dict()),
        status_code=exc.status,
        headers=exc.headers,
        media_type="application/json",
    )


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``messages[0].role``, as OpenAI names params."""
    parts = [p for p in loc if p not in ("body", "query")]
    # pydantic adds the member type it tried for unions (e.g. "str", "list[...]"): drop those
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def validation_message(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """Turn pydantic's first error into OpenAI-style wording."""
    if not errors:
        return InvalidRequest("The request is invalid.")
    error = errors[0]
    kind = str(error.get("type", ""))
    param = _param(tuple(error.get("loc", ())))
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. "
            "Send valid JSON with `Content-Type: application/json`."
        )
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return InvalidRequest("The request body must be a JSON object.")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    expected = next((v for k, v in _TYPE_NAMES.items() if kind.startswith(k)), None)
    if kind.endswith("_type") and expected:
        got = type(error.get("input")).__name__
        got = {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "a boolean",
            "list": "an array",
            "dict": "an object",
            "NoneType": "null",
        }.get(got, got)
        return InvalidRequest(
            f"Invalid type for '{param}': expected {expected}, but got {got} instead.", param=param
        )
    # pydantic's own messages are written for users ("Input should be greater than 0").
    reason = error.get("msg", "invalid")
    return InvalidRequest(f"Invalid value for '{param}': {reason}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_tokenrelay_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TokenrelayError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_message(list(exc.errors())))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {
            404: f"Unknown request URL: {request.method} {request.url.path}.",
            405: f"Method {request.method} is not allowed for {request.url.path}.",
        }.get(exc.status_code, "The request could not be handled.")
        err = InvalidRequest(message, code=codes.get(exc.status_code))
        err.status = exc.status_code
        err.headers = dict(exc.headers or {})
        return error_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(TokenrelayError(INTERNAL_ERROR))

    app.add_exception_handler(TokenrelayError, on_tokenrelay_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
