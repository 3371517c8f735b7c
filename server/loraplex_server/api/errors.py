"""The refusals the request path raises itself (the engine, the store and the adapter manager have their own);
status.py maps each to its gRPC status, HTTP status and message."""

from __future__ import annotations

from loraplex_server.engine.engine import WrongTask  # the task check's refusal, raised here too

__all__ = ["BaseLoading", "InvalidRequest", "PayloadTooLarge", "PermissionDenied", "ShuttingDown", "Unauthenticated",
           "WrongTask"]


class InvalidRequest(ValueError):
    """The request is wrong, and the message says how (INVALID_ARGUMENT / 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BaseLoading(RuntimeError):
    """The base model is still loading (UNAVAILABLE / 503)."""


class ShuttingDown(RuntimeError):
    """The server stopped while this request was running (UNAVAILABLE / 503)."""


class Unauthenticated(PermissionError):
    """No token, or one the server does not know (UNAUTHENTICATED / 401)."""


class PermissionDenied(PermissionError):
    """A known token that may not call this method (PERMISSION_DENIED / 403)."""


class PayloadTooLarge(ValueError):
    """The request body is over the server's limit (RESOURCE_EXHAUSTED / 413)."""
