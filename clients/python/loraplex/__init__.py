"""loraplex client SDK (grpc + protobuf only; no torch).

The generated stubs live in this package too (`loraplex.v1`, `loraplex.oip`): the server and the trainer
import them, the wire contract both sides share. Importing a stub runs this file, so the SDK's own
classes load lazily, on first use of a name below: a stub import loads stubs only.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "AdapterInfo": "adapters", "Adapters": "adapters", "AsyncAdapters": "adapters",
    "AsyncClient": "client", "Client": "client",
    "FailedPrecondition": "errors", "InvalidArgument": "errors", "LoraplexError": "errors", "NotFound": "errors",
    "PermissionDenied": "errors", "ResourceExhausted": "errors", "Unauthenticated": "errors", "Unavailable": "errors",
    "HealthStatus": "health",
    "Choice": "results", "Classification": "results", "Embeddings": "results", "Generation": "results",
    "GenerationChunk": "results", "TokenLogprob": "results",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
