"""`loraplex train {classification,generation} --data FILE --output DIR`: fine-tune a LoRA adapter, evaluate
it against the base on held-out data, and optionally register it (upload to a server, or a local store)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from loraplex import LoraplexError

from .trainer import TrainConfig, TrainResult, train


def _list(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


def build_parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in fields(TrainConfig) if not callable(f.default_factory)}
    parser = argparse.ArgumentParser(prog="loraplex train", description=__doc__)
    parser.add_argument("task", choices=["classification", "generation"])
    parser.add_argument("--data", required=True, help="training rows: .csv or .jsonl")
    parser.add_argument("--output", required=True, help="folder for the adapter (OUTPUT/adapter) and checkpoints")
    parser.add_argument("--name", default="", help="adapter name when registering (default: the output folder's)")
    parser.add_argument("--base", default=None, help="local HF model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--eval-data", default=None, help="held-out rows (default: --eval-fraction of --data)")
    parser.add_argument("--eval-fraction", type=float, default=defaults["eval_fraction"])
    for name in ("text_field", "label_field", "prompt_field", "completion_field", "messages_field"):
        parser.add_argument(f"--{name.replace('_', '-')}", default=defaults[name])
    parser.add_argument("--labels", type=_list, default=[], help="label names in head order (default: sorted values)")
    parser.add_argument("--rank", type=int, default=defaults["rank"])
    parser.add_argument("--alpha", type=int, default=defaults["alpha"])
    parser.add_argument("--dropout", type=float, default=defaults["dropout"])
    parser.add_argument("--target-modules", type=_list, default=[],
                        help="comma-separated (default: attention projections of the architecture)")
    parser.add_argument("--learning-rate", type=float, default=defaults["learning_rate"])
    parser.add_argument("--epochs", type=int, default=defaults["epochs"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--grad-accum", type=int, default=defaults["grad_accum"])
    parser.add_argument("--warmup", type=float, default=defaults["warmup"], help="fraction of the optimizer steps")
    parser.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    parser.add_argument("--max-length", type=int, default=defaults["max_length"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--dtype", default=defaults["dtype"], choices=["auto", "bfloat16", "float32"],
                        help="auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else float32")
    parser.add_argument("--quantize", default=defaults["quantize"], choices=["auto", "nf4", "int8", "none"],
                        help="auto: nf4 (QLoRA) on CUDA, none on CPU")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    register = parser.add_mutually_exclusive_group()
    register.add_argument("--register", metavar="SERVER", default=None,
                          help="upload the adapter to this server (host:port; admin token from --token)")
    register.add_argument("--store", default=None, help="publish the adapter into this local store")
    parser.add_argument("--token", default=None, help="admin token for --register")
    return parser


def register(result: TrainResult, server: str | None, store: str | None, token: str | None) -> str | None:
    """Upload to a server or publish into a store; returns the `name@version` it got."""
    manifest = result.manifest
    metrics = manifest.extra["metrics"]
    if server:
        from loraplex import Client

        with Client(server, token=token) as client:
            info = client.adapters.upload(result.output, name=manifest.name, labels=manifest.labels, metrics=metrics,
                                          base_fingerprint=manifest.extra["base_fingerprint"])
        return info.reference
    if store:
        from .store import AdapterStore

        published = AdapterStore(store).publish(result.output, manifest.name, labels=manifest.labels,
                                                base_fingerprint=manifest.extra["base_fingerprint"], metrics=metrics)
        return f"{published.name}@{published.version}"
    return None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        result = train(config, progress=not args.no_progress)
        reference = register(result, args.register, args.store, args.token)
    except (ValueError, OSError, LoraplexError) as exc:  # DataError, AdapterFormatError, a refused upload
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"adapter": str(result.output), "registered": reference, "best_epoch": result.best_epoch,
                      "before": result.before, "after": result.after}))
    return 0
