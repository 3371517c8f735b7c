"""loraplex client SDK (grpc + protobuf only; no torch)."""

from .adapters import AdapterInfo, Adapters, AsyncAdapters
from .client import AsyncClient, Client
from .errors import (
    FailedPrecondition,
    InvalidArgument,
    LoraplexError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .health import HealthStatus
from .results import Classification, Generation, GenerationChunk

__version__ = "0.1.0"
__all__ = ["AdapterInfo", "Adapters", "AsyncAdapters", "AsyncClient", "Classification", "Client",
           "FailedPrecondition", "Generation", "GenerationChunk", "HealthStatus", "InvalidArgument", "LoraplexError",
           "NotFound", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable"]
