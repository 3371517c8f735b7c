"""Every failure a servicer sees, mapped to the gRPC status a client can act on."""

from __future__ import annotations

import logging

import grpc

from loraplex_adapters.store import AdapterNotInStore, AdapterTooLarge, BaseMismatch

from .adapter_cache import PinRefused, WrongBase
from .engine import AdapterInUse, AdapterNotFound, EngineFailure, WrongTask
from .scheduler import QueueFull

log = logging.getLogger(__name__)

_CODES = [  # first match wins: several of these are ValueErrors too
    ((AdapterNotFound, AdapterNotInStore), grpc.StatusCode.NOT_FOUND),
    ((WrongTask, WrongBase, BaseMismatch, AdapterInUse, PinRefused), grpc.StatusCode.FAILED_PRECONDITION),
    ((QueueFull, AdapterTooLarge), grpc.StatusCode.RESOURCE_EXHAUSTED),
    # InvalidRequest, AdapterFormatError and every other ValueError (UnicodeDecodeError, JSONDecodeError...):
    # the input was wrong, and the message says how.
    ((ValueError,), grpc.StatusCode.INVALID_ARGUMENT),
    ((EngineFailure,), grpc.StatusCode.INTERNAL),
]
INTERNAL_MESSAGE = "internal error while handling the request; the server log has the details"


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with exc's status and message; re-raise what is not a known failure."""
    for types, code in _CODES:
        if isinstance(exc, types):
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            await context.abort(code, message)
    raise exc


async def abort_or_internal(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """abort_for, and INTERNAL with a generic message (the traceback goes to the log) for any other
    exception: a client never sees UNKNOWN with an exception's class name or a server path."""
    if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
        raise exc  # an abort already under way, or a cancellation
    try:
        await abort_for(context, exc)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.error("unexpected failure in an RPC", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
