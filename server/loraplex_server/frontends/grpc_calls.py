"""What every gRPC codec (ours, KServe's, the Ray replica's) does at its edges: read the caller from the
metadata, and end a failed call with the status table's code and message."""

from __future__ import annotations

import grpc

from loraplex_server.api.auth import bearer_token
from loraplex_server.api.requests import Call
from loraplex_server.api.status import status_of


def call_of(context, method: str) -> Call:
    """The api's view of this call: its method and the bearer token in its `authorization` metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return Call(method, bearer_token(value))
    return Call(method)


async def abort_for(context, exc: BaseException) -> None:
    """Abort the RPC with exc's status and message (an unknown failure: INTERNAL, logged by status_of)."""
    if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
        raise exc  # an abort already under way, or a cancellation
    status = status_of(exc)
    await context.abort(status.code, status.message)
