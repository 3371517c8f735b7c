"""The server's health as a status whose truth value means "serving"."""

from __future__ import annotations

import enum

from grpc_health.v1 import health_pb2, health_pb2_grpc


class HealthStatus(enum.StrEnum):
    """grpc.health.v1 serving status. `bool(status)` is True only for SERVING, and a status still equals its
    name as a string (`status == "SERVING"`)."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"

    def __bool__(self) -> bool:
        return self is HealthStatus.SERVING


def health_status(response: health_pb2.HealthCheckResponse) -> HealthStatus:
    return HealthStatus(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def health_stub(channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


def not_serving_after(timeout: float, last: str) -> TimeoutError:
    return TimeoutError(f"the server was not SERVING within {timeout:g} s (last answer: {last})")
