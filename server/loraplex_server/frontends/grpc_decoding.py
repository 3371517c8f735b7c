"""Requests whose bytes are not a valid protobuf message get INVALID_ARGUMENT, not UNKNOWN.

grpc decodes a request before any servicer code runs; a decode failure escapes as an unexpected
exception and the client sees UNKNOWN with the exception's class name. This interceptor (the outermost
one, so it also covers the handlers that other interceptors return) swaps each handler's request
deserializer for one that returns a marker instead of raising, and answers the marker with
INVALID_ARGUMENT "request is not a valid <message>".
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class _Undecodable:
    def __init__(self, message: str) -> None:
        self.message = message


def _message_name(deserializer) -> str:
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


def _tolerant(deserializer):
    name = _message_name(deserializer)

    def decode(raw: bytes):
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, and whatever else the bytes make the parser raise
            log.debug("undecodable %s (%d bytes)", name, len(raw))
            return _Undecodable(f"request is not a valid {name} (the bytes do not decode as that protobuf message)")

    return decode


async def _refuse(context, marker: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, marker.message)


def _unary_request(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        return stream

    async def unary(request, context):
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        return await behavior(request, context)
    return unary


def _streamed_requests(behavior):
    async def checked(requests, context):
        async for request in requests:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            yield request

    if inspect.isasyncgenfunction(behavior):
        async def stream(requests, context):
            async with contextlib.aclosing(behavior(checked(requests, context), context)) as responses:
                async for response in responses:
                    yield response
        return stream

    async def unary(requests, context):
        return await behavior(checked(requests, context), context)
    return unary


def _is_async(behavior) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class RequestDecoding(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _tolerant(handler.request_deserializer)
        kwargs = {"request_deserializer": decode, "response_serializer": handler.response_serializer}
        if handler.unary_unary and _is_async(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary), **kwargs)
        if handler.unary_stream and _is_async(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream), **kwargs)
        if handler.stream_unary and _is_async(handler.stream_unary):
            return grpc.stream_unary_rpc_method_handler(_streamed_requests(handler.stream_unary), **kwargs)
        if handler.stream_stream and _is_async(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(_streamed_requests(handler.stream_stream), **kwargs)
        return handler  # a synchronous handler: left as grpc runs it
