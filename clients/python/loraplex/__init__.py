"""loraplex client SDK (grpc + protobuf only; no torch)."""

from .client import (
    AsyncClient,
    Classification,
    Client,
    FailedPrecondition,
    Generation,
    GenerationChunk,
    InvalidArgument,
    LoraplexError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Classification", "Client", "FailedPrecondition", "Generation", "GenerationChunk",
           "InvalidArgument", "LoraplexError", "NotFound", "ResourceExhausted", "Unauthenticated", "Unavailable"]
