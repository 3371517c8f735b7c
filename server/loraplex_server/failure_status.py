"""One place that says which status a failure gets, for both front ends (gRPC and the HTTP API).

status.py keeps the table of the engine's and store's failures; the chat failure added here is
checked first. HTTP statuses are derived from the gRPC code, so the two APIs cannot disagree.
"""

from __future__ import annotations

import grpc

from .chat_template import NoChatTemplate
from .status import abort_for

_EXTRA_CODES = [((NoChatTemplate,), grpc.StatusCode.FAILED_PRECONDITION)]

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # the request cannot work on this model (vLLM answers 400 too)
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


async def abort_with_status(context, exc: BaseException) -> None:
    """Abort the RPC with exc's status and message; re-raise what is not a known failure."""
    for types, code in _EXTRA_CODES:
        if isinstance(exc, types):
            await context.abort(code, str(exc))
    await abort_for(context, exc)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _RecordingContext:
    """Stands in for a servicer context: its abort says which status the failure maps to."""

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise _Aborted(code, message)


async def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status and message of a known failure; None for anything else (an internal error)."""
    try:
        await abort_with_status(_RecordingContext(), exc)
    except _Aborted as aborted:
        return aborted.code, aborted.message
    except Exception:  # abort_for re-raises what it does not know
        return None
    return None


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)
