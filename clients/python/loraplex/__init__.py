"""loraplex client SDK (grpc + protobuf only; no torch)."""

from .adapters import AdapterInfo
from .client import AsyncClient, Classification, Client, Generation, GenerationChunk
from .errors import (
    FailedPrecondition,
    InvalidArgument,
    LoraplexError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"
__all__ = ["AdapterInfo", "AsyncClient", "Classification", "Client", "FailedPrecondition", "Generation",
           "GenerationChunk", "InvalidArgument", "LoraplexError", "NotFound", "ResourceExhausted", "Unauthenticated",
           "Unavailable"]
