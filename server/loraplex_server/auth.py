"""Bearer-token authentication for the gRPC server (`authorization: Bearer <token>` metadata).

Inference methods accept any user or admin token; adapter management (issue 4's AdapterService)
only admin tokens. Health checking and reflection stay open, as load balancers and tools expect.
"""

from __future__ import annotations

import hmac

import grpc

# Liveness and readiness of KServe's Open Inference Protocol are health checks too (Kubernetes probes).
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.", "/inference.GRPCInferenceService/ServerLive",
                 "/inference.GRPCInferenceService/ServerReady")
ADMIN_PREFIXES = ("/loraplex.v1.AdapterService/",)


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def _matches(token: str | None, allowed: list[str]) -> bool:
    # Compare against every token in constant time, so timing does not reveal a prefix.
    return token is not None and any(hmac.compare_digest(token.encode(), a.encode()) for a in allowed)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the real one that answers UNAUTHENTICATED."""

    async def abort_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str], admin_tokens: list[str]) -> None:
        self.tokens = list(tokens)
        self.admin_tokens = list(admin_tokens)

    async def intercept_service(self, continuation, details):
        method = details.method
        handler = await continuation(details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        token = _bearer(details.invocation_metadata)
        if method.startswith(ADMIN_PREFIXES):
            if _matches(token, self.admin_tokens):
                return handler
            return _refusal(handler, "this method needs an admin token (authorization: Bearer <admin token>)")
        if _matches(token, self.tokens + self.admin_tokens):
            return handler
        reason = "missing" if token is None else "invalid"
        return _refusal(handler, f"{reason} bearer token; send metadata `authorization: Bearer <token>`")
