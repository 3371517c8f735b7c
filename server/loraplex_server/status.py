"""Every failure a servicer sees, mapped to the gRPC status a client can act on."""

from __future__ import annotations

import grpc

from loraplex_adapters.store import AdapterNotInStore, AdapterTooLarge, BaseMismatch

from .adapter_cache import PinRefused, WrongBase
from .engine import AdapterInUse, AdapterNotFound, EngineFailure, WrongTask
from .scheduler import QueueFull

_CODES = [  # first match wins: several of these are ValueErrors too
    ((AdapterNotFound, AdapterNotInStore), grpc.StatusCode.NOT_FOUND),
    ((WrongTask, WrongBase, BaseMismatch, AdapterInUse, PinRefused), grpc.StatusCode.FAILED_PRECONDITION),
    ((QueueFull, AdapterTooLarge), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((ValueError,), grpc.StatusCode.INVALID_ARGUMENT),  # InvalidRequest, AdapterFormatError, ...
    ((EngineFailure,), grpc.StatusCode.INTERNAL),
]


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with exc's status and message; re-raise what is not a known failure."""
    for types, code in _CODES:
        if isinstance(exc, types):
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            await context.abort(code, message)
    raise exc
