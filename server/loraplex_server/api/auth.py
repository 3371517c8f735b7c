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


class TokenPolicy:
    """Who may call what: user or admin tokens for inference, admin tokens for adapter management. Used by
    the gRPC interceptor below and by Ray Serve replicas, whose proxy checks nothing itself."""

    def __init__(self, tokens: list[str], admin_tokens: list[str]) -> None:
        self.tokens = list(tokens)
        self.admin_tokens = list(admin_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.admin_tokens)

    def refusal(self, metadata, admin: bool) -> str | None:
        """Why a call with this metadata is refused (UNAUTHENTICATED), or None when it may go on."""
        if not self.enabled:
            return None
        token = _bearer(metadata)
        if admin:
            if _matches(token, self.admin_tokens):
                return None
            return "this method needs an admin token (authorization: Bearer <admin token>)"
        if _matches(token, self.tokens + self.admin_tokens):
            return None
        reason = "missing" if token is None else "invalid"
        return f"{reason} bearer token; send metadata `authorization: Bearer <token>`"


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str], admin_tokens: list[str]) -> None:
        self.policy = TokenPolicy(tokens, admin_tokens)

    async def intercept_service(self, continuation, details):
        method = details.method
        handler = await continuation(details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        message = self.policy.refusal(details.invocation_metadata, admin=method.startswith(ADMIN_PREFIXES))
        return handler if message is None else _refusal(handler, message)
