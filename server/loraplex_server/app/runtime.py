"""`build_runtime(options)`: the engine, the adapter store and cache, and the loop that owns them, built the
same way for `loraplex serve` and for every Ray Serve replica."""

from __future__ import annotations

import argparse
import logging

from loraplex_adapters.examples import publish_examples
from loraplex_adapters.store_protocol import open_store
from loraplex_server.api.metrics import Metrics
from loraplex_server.api.serving_runtime import ServingRuntime
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.pooling import pooling_of
from loraplex_server.engine.step_threads import step_threads

log = logging.getLogger("loraplex.serve")


def store_location(args: argparse.Namespace) -> str:
    return args.adapter_store or args.adapter_dir


def build_runtime(args: argparse.Namespace, metrics: Metrics, examples: bool = False) -> ServingRuntime:
    """Load the base (blocking: seconds to minutes), open the store every replica shares (--adapter-store or
    --adapter-dir) and start the engine loop. `examples`: publish the shipped example adapters into the
    store (a new default store, on a single server's first start)."""
    base = load_base_model(args.base, quantize=args.quantize, dtype=args.dtype, device=args.device)
    pooling = pooling_of(base.path, base.kind, getattr(args, "embed_pooling", None),
                         getattr(args, "embed_normalize", None))
    engine = Engine(base, max_adapters=args.max_adapters, max_batch=args.max_batch,
                    max_batch_tokens=args.max_batch_tokens or None, kv_cache_memory=args.kv_cache_memory or None,
                    pooling=pooling, threads=step_threads(args.threads, base.device))
    location = store_location(args)
    store = open_store(location, base_fingerprint=engine.base.fingerprint, max_rank=args.max_rank,
                       max_bytes=args.max_upload_bytes, allow_base_mismatch=args.allow_base_mismatch,
                       check_fits=engine.slots.shapes.validate)
    if examples:
        published = publish_examples(store, engine.base.fingerprint)
        log.info("new adapter store %s: published the example adapters %s (--no-examples skips this)",
                 location, ", ".join(m.name for m in published) or "(none: they were trained on another base)")
    runtime = ServingRuntime.create(engine, store, args.adapter_memory, args.host_adapter_memory, metrics,
                                    args.max_pending)
    runtime.start()
    return runtime
