"""The few error types tokenrelay raises, each knowing its HTTP status and OpenAI error fields.

They are mapped to responses in one place (`tokenrelay.api.errors`); everything else only raises.
Messages are written for the person calling the API and never carry an internal exception's text.
"""

from __future__ import annotations

__all__ = [
    "TokenrelayError",
    "InvalidRequest",
    "ModelNotFound",
    "RequestTooLarge",
    "Forbidden",
    "UnsupportedMediaType",
    "ClientGone",
    "RateLimited",
    "UpstreamError",
    "UpstreamUnavailable",
    "UpstreamTimeout",
    "ModelUnavailable",
    "ModelCrashed",
    "StreamNotFound",
    "StreamTooLarge",
    "StreamInterrupted",
    "Unauthorized",
    "ModelNotAllowed",
    "DatabaseUnavailable",
    "RedisUnavailable",
    "ClientDisconnected",
]


class TokenrelayError(Exception):
    """Base of every error that becomes an OpenAI-shaped error response."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, dict[str, object]]:
        """The body OpenAI's clients expect: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(TokenrelayError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(TokenrelayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class RequestTooLarge(TokenrelayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Forbidden(TokenrelayError):
    """Refused by a request guard: a foreign ``Host`` or ``Origin``, or a cross-site request."""

    status = 403
    type = "invalid_request_error"


class Unauthorized(TokenrelayError):
    """No gateway key, or one that is wrong, revoked or expired: 401, worded as OpenAI's."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotAllowed(Forbidden):
    """The caller's key may not use this model."""

    code = "model_not_allowed"

    def __init__(self, model: str) -> None:
        super().__init__(f"This key may not use the model `{model}`.", param="model")


class UnsupportedMediaType(TokenrelayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ClientGone(TokenrelayError):
    """The client left before its request body arrived: nobody is there to answer, and that is
    no error of ours (499 is nginx's "client closed request"; the response is never sent)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class RateLimited(TokenrelayError):
    """Too many requests waiting; ``retry_after`` seconds is sent as ``Retry-After``."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int = 1,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message, code=code, headers={**(headers or {}), "Retry-After": str(retry_after)}
        )


class UpstreamError(TokenrelayError):
    """The upstream answered an error; status and message come from it, scrubbed of secrets."""

    type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.status = status
        if type is not None:
            self.type = type


class UpstreamUnavailable(TokenrelayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(TokenrelayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ModelUnavailable(TokenrelayError):
    """A configured model cannot be used (e.g. its file is missing or unreadable)."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class ModelCrashed(TokenrelayError):
    """The local model's worker process died while answering; it is being restarted."""

    status = 503
    type = "server_error"
    code = "model_crashed"


class StreamNotFound(TokenrelayError):
    """No stream has this id here: it never existed, or it ended and expired."""

    status = 404
    type = "invalid_request_error"
    code = "stream_not_found"

    def __init__(self, stream_id: str) -> None:
        super().__init__(
            f"No stream `{stream_id}`: it does not exist or it has expired.", param="stream_id"
        )


class StreamTooLarge(TokenrelayError):
    """An answer outgrew ``stream_max_bytes``; its stream is cut short there."""

    status = 500
    type = "server_error"
    code = "stream_too_large"


class StreamInterrupted(TokenrelayError):
    """The process writing a stream stopped (crash, kill) before the answer ended."""

    status = 503
    type = "server_error"
    code = "interrupted"


class DatabaseUnavailable(TokenrelayError):
    """The database cannot be reached where an answer cannot do without it (a key's lookup)."""

    status = 503
    type = "server_error"
    code = "database_unavailable"


class RedisUnavailable(TokenrelayError):
    """Redis, where streams and shared state live with ``redis_url`` set, cannot be reached."""

    status = 503
    type = "server_error"
    code = "redis_unavailable"


class ClientDisconnected(TokenrelayError):
    """The client left before its answer was ready; its work was cancelled and nobody reads this.

    499 is nginx's "client closed request": it shows in access logs for what it is.
    """

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the answer was ready.")
