"""Typed errors of the SDK: one class per gRPC status a caller may want to handle."""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """A failed call; `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class NotFound(LoraplexError):
    pass


class InvalidArgument(LoraplexError):
    pass


class FailedPrecondition(LoraplexError):
    pass


class Unavailable(LoraplexError):
    pass


class Unauthenticated(LoraplexError):
    pass


class PermissionDenied(LoraplexError):
    """A valid token that may not call this method (a user token on adapter management)."""


class ResourceExhausted(LoraplexError):
    pass


_ERRORS = {grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
           grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition, grpc.StatusCode.UNAVAILABLE: Unavailable,
           grpc.StatusCode.UNAUTHENTICATED: Unauthenticated, grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
           grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted}


def error_from(exc: grpc.RpcError) -> LoraplexError:
    code = exc.code()
    return _ERRORS.get(code, LoraplexError)(code, exc.details() or "")
