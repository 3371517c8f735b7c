"""The one status table: every failure a front end can see -> the gRPC status, the HTTP status and a message a
client can act on. Anything not in the table is a bug: INTERNAL / 500 with a generic message, and the
traceback goes to the server log (never to the client)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from loraplex_adapters.s3_store import StoreUnavailable  # boto3 itself is imported only by an s3:// store
from loraplex_adapters.store import AdapterNotInStore, AdapterTooLarge, BaseMismatch
from loraplex_server.api.chat_template import NoChatTemplate
from loraplex_server.api.errors import (
    BaseLoading,
    PayloadTooLarge,
    PermissionDenied,
    ShuttingDown,
    Unauthenticated,
    WrongTask,
)
from loraplex_server.api.serving_runtime import AdapterInUse, AdapterNotFound, PinRefused, QueueFull, WrongBase
from loraplex_server.engine.engine import EngineFailure

log = logging.getLogger(__name__)

_CODES = [  # first match wins: several of these are ValueErrors too
    ((Unauthenticated,), grpc.StatusCode.UNAUTHENTICATED),
    ((PermissionDenied,), grpc.StatusCode.PERMISSION_DENIED),
    ((BaseLoading, ShuttingDown, StoreUnavailable), grpc.StatusCode.UNAVAILABLE),  # retry later
    ((AdapterNotFound, AdapterNotInStore), grpc.StatusCode.NOT_FOUND),
    ((WrongTask, WrongBase, BaseMismatch, AdapterInUse, PinRefused, NoChatTemplate),
     grpc.StatusCode.FAILED_PRECONDITION),
    ((QueueFull, AdapterTooLarge, PayloadTooLarge), grpc.StatusCode.RESOURCE_EXHAUSTED),
    # InvalidRequest, AdapterFormatError and every other ValueError (UnicodeError, JSONDecodeError...):
    # the input was wrong, and the message says how.
    ((ValueError,), grpc.StatusCode.INVALID_ARGUMENT),
    ((EngineFailure,), grpc.StatusCode.INTERNAL),
]
INTERNAL_MESSAGE = "internal error while handling the request; the server log has the details"

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
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
_HTTP_OVERRIDES = {PayloadTooLarge: 413}  # HTTP has a closer status than the gRPC code's


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    http: int
    message: str
    param: str | None = None  # the request field at fault, when one is


def status_of(exc: BaseException) -> Status:
    """The status of any failure; an unknown exception is logged with its traceback and becomes INTERNAL."""
    if isinstance(exc, asyncio.CancelledError):
        return Status(grpc.StatusCode.CANCELLED, 499, "the request was cancelled")
    for types, code in _CODES:
        if isinstance(exc, types):
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            http = next((s for t, s in _HTTP_OVERRIDES.items() if isinstance(exc, t)), HTTP_STATUS.get(code, 500))
            return Status(code, http, message, getattr(exc, "param", None))
    log.error("unexpected failure while handling a request", exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, 500, INTERNAL_MESSAGE)


def code_name(exc: BaseException | None) -> str:
    """The gRPC code name a request ended with, for metrics and the access log (no logging here)."""
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return next((code.name for types, code in _CODES if isinstance(exc, types)), "INTERNAL")
