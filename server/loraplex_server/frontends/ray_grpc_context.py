"""The servicer context our gRPC servicers expect (`abort`, `code`), on top of Ray Serve's gRPC context.

Ray Serve hands a replica method a `RayServegRPCContext`. A code and details set on it before an
exception propagates reach the caller unchanged (Ray wraps the exception in its gRPCStatusError), so
`abort` sets them and raises grpc's own AbortError, which our `abort_for` already knows means "an abort
under way".
"""

from __future__ import annotations

import grpc


class RayServicerContext:
    def __init__(self, ray_context) -> None:
        self._ray = ray_context

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        if self._ray is not None:
            self._ray.set_code(code)
            self._ray.set_details(details)
        raise grpc.aio.AbortError(f"{code.name}: {details}")

    def code(self) -> grpc.StatusCode | None:
        return self._ray.code() if self._ray is not None else None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._ray.invocation_metadata() if self._ray is not None else []
