"""Every failure a front end sees, mapped to the gRPC status a client can act on, and from it the HTTP status
of the HTTP API, so the two front ends cannot disagree."""

from __future__ import annotations

import logging

import grpc

from loraplex_adapters.s3_store import StoreUnavailable  # boto3 itself is imported only by an s3:// store
from loraplex_adapters.store import AdapterNotInStore, AdapterTooLarge, BaseMismatch
from loraplex_server.api.chat_template import NoChatTemplate
from loraplex_server.engine.engine import AdapterInUse, AdapterNotFound, EngineFailure, WrongTask
from loraplex_server.runtime.adapter_manager import PinRefused, WrongBase
from loraplex_server.runtime.engine_loop import QueueFull

log = logging.getLogger(__name__)

_CODES = [  # first match wins: several of these are ValueErrors too
    ((AdapterNotFound, AdapterNotInStore), grpc.StatusCode.NOT_FOUND),
    ((WrongTask, WrongBase, BaseMismatch, AdapterInUse, PinRefused, NoChatTemplate),
     grpc.StatusCode.FAILED_PRECONDITION),
    ((QueueFull, AdapterTooLarge), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((StoreUnavailable,), grpc.StatusCode.UNAVAILABLE),  # the shared store (S3) did not answer: retry later
    # InvalidRequest, AdapterFormatError and every other ValueError (UnicodeDecodeError, JSONDecodeError...):
    # the input was wrong, and the message says how.
    ((ValueError,), grpc.StatusCode.INVALID_ARGUMENT),
    ((EngineFailure,), grpc.StatusCode.INTERNAL),
]
INTERNAL_MESSAGE = "internal error while handling the request; the server log has the details"

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


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status and message of a known failure; None for anything else (a bug: an internal error)."""
    for types, code in _CODES:
        if isinstance(exc, types):
            return code, exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return None


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with exc's status and message. Anything unknown becomes INTERNAL with a generic message
    (the traceback goes to the log): a client never sees UNKNOWN, an exception's class name or a server path."""
    if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
        raise exc  # an abort already under way, or a cancellation
    known = status_of(exc)
    if known is None:
        log.error("unexpected failure in an RPC", exc_info=exc)
        known = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    await context.abort(*known)
