"""`loraplex train {classification,generation} --data FILE --output DIR`: fine-tune a LoRA adapter, evaluate
it against the base on held-out data, and optionally register it (upload to a server, or a local store)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from .help_format import HelpFormatter
from .trainer import TrainConfig, TrainResult, summary_line, train
from .training_eval import headline
from .training_schedule import (
    EVALUATIONS,
    FULL_LEARNING_RATE,
    LORA_LEARNING_RATE,
    MAX_EPOCHS,
    PATIENCE,
    SMALL_DATA_ROWS,
    TARGET_STEPS,
)

NOT_BETTER = 3  # the exit status when the adapter did not beat the base and was not written

Upload = Callable[[str, str | None, Path, str, list[str], dict, str], str]


def _list(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


FIELD_HELP = {"text_field": "column (CSV) or key (JSONL) of the text to classify",
              "label_field": "column or key of the label",
              "prompt_field": "column or key of the prompt",
              "completion_field": "column or key of the completion the adapter learns to write",
              "messages_field": "key of a chat (a list of role/content messages); used instead of prompt/completion "
                                "when rows have it"}
TASK_FIELDS = {"classification": ("text_field", "label_field"),
               "generation": ("prompt_field", "completion_field", "messages_field")}


def _common_options(defaults: dict) -> argparse.ArgumentParser:
    """The options of both tasks; each task's parser adds only its own data fields."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data", required=True, help="training rows: .csv or .jsonl")
    parser.add_argument("--output", required=True, help="folder for the adapter (OUTPUT/adapter) and checkpoints")
    parser.add_argument("--name", default="", help="adapter name when registering (default: the output folder's)")
    parser.add_argument("--base", default=None, help="local HF model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--eval-data", default=None, help="held-out rows (default: --eval-fraction of --data)")
    parser.add_argument("--eval-fraction", type=float, default=defaults["eval_fraction"],
                        help="share of --data held out for evaluation when --eval-data is not given")
    parser.add_argument("--rank", type=int, default=defaults["rank"], help="LoRA rank r")
    parser.add_argument("--alpha", type=int, default=defaults["alpha"], help="LoRA alpha (scaling = alpha / r)")
    parser.add_argument("--dropout", type=float, default=defaults["dropout"], help="LoRA dropout")
    parser.add_argument("--target-modules", type=_list, default=[],
                        help="comma-separated (default: attention projections of the architecture)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"AdamW learning rate (default: {LORA_LEARNING_RATE:g})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"most passes over the training rows (default: auto, about {TARGET_STEPS} optimizer steps "
                             f"in all, at most {MAX_EPOCHS} epochs)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"rows per forward pass (default: auto, 8 below {SMALL_DATA_ROWS} training rows, else 16)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"optimizer steps between held-out evaluations, besides each epoch's end (default: auto, "
                             f"every epoch on small data, about {EVALUATIONS} in all on large data)")
    parser.add_argument("--patience", type=int, default=PATIENCE,
                        help="stop after this many evaluations without a better held-out score (0: never stop early)")
    parser.add_argument("--grad-accum", type=int, default=defaults["grad_accum"],
                        help="batches per optimizer step")
    parser.add_argument("--warmup", type=float, default=defaults["warmup"], help="fraction of the optimizer steps")
    parser.add_argument("--weight-decay", type=float, default=defaults["weight_decay"], help="AdamW weight decay")
    parser.add_argument("--max-length", type=int, default=defaults["max_length"],
                        help="training rows are truncated to this many tokens")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the split, init and shuffling")
    parser.add_argument("--dtype", default=defaults["dtype"], choices=["auto", "bfloat16", "float32"],
                        help="auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else float32")
    parser.add_argument("--quantize", default=defaults["quantize"], choices=["auto", "nf4", "int8", "none"],
                        help="auto: nf4 (QLoRA) on CUDA, none on CPU")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="write and register the adapter even when it is no better than the base on held-out data")
    parser.add_argument("--compare-full", action="store_true",
                        help="also fine-tune every weight of the base on the same split (fp32, same epochs and early "
                             "stopping) and print both scores and their ratio, LoRA / full")
    parser.add_argument("--full-learning-rate", type=float, default=None,
                        help=f"learning rate of --compare-full (default: {FULL_LEARNING_RATE:g})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    register = parser.add_mutually_exclusive_group()
    register.add_argument("--register", metavar="SERVER", default=None,
                          help="upload the adapter to this server, host:port (default: none; admin token: --token)")
    register.add_argument("--store", default=None,
                          help="publish the adapter into this store, a folder or s3://bucket/prefix (default: none)")
    parser.add_argument("--token", default=None, help="admin token for --register (default: none)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in fields(TrainConfig) if not callable(f.default_factory)}
    common = _common_options(defaults)
    parser = argparse.ArgumentParser(prog="loraplex train", description=__doc__, formatter_class=HelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, text in (("classification", "a classifier: text -> one of the labels (a score head on the base)"),
                       ("generation", "a generator: prompt -> completion, or chat messages -> the assistant's turn")):
        command = tasks.add_parser(task, parents=[common], help=text, description=text, formatter_class=HelpFormatter)
        for name in TASK_FIELDS[task]:
            command.add_argument(f"--{name.replace('_', '-')}", default=defaults[name], help=FIELD_HELP[name])
        if task == "classification":
            command.add_argument("--labels", type=_list, default=[],
                                 help="label names in head order (default: sorted values)")
    return parser


def register(result: TrainResult, server: str | None, store: str | None, token: str | None,
             upload: Upload | None = None) -> str | None:
    """Upload to a server (through `upload`, the SDK's: the trainer imports no client) or publish into a
    store; returns the `name@version` it got."""
    manifest = result.manifest
    metrics = manifest.extra["metrics"]
    if server:
        if upload is None:
            raise ValueError("--register uploads through the loraplex client: run `loraplex train`")
        return upload(server, token, result.output, manifest.name, manifest.labels, metrics,
                      manifest.extra["base_fingerprint"])
    if store:
        from .store_protocol import open_store

        published = open_store(store).publish(result.output, manifest.name, labels=manifest.labels,
                                              base_fingerprint=manifest.extra["base_fingerprint"], metrics=metrics)
        return f"{published.name}@{published.version}"
    return None


def main(argv: list[str], upload: Upload | None = None) -> int:
    """`upload(server, token, folder, name, labels, metrics, base_fingerprint) -> name@version` registers on a
    server (the `loraplex` command passes the SDK's)."""
    args = build_parser().parse_args(argv)
    # The other task's fields are not options of this one: they keep their defaults.
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    try:
        result = train(config, progress=not args.no_progress)
        reference = register(result, args.register, args.store, args.token, upload) if result.written else None
    except (ValueError, OSError) as exc:  # DataError, AdapterFormatError (a refused upload: the caller's)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"adapter": str(result.output) if result.written else None, "registered": reference,
                      "beats_base": result.beats_base, "base": result.base, "best_epoch": result.best_epoch,
                      "stopped_early": result.stopped_early, "seconds": round(result.seconds),
                      "schedule": asdict(result.schedule), "before": result.before, "after": result.after,
                      "compare_full": result.comparison}))
    if result.comparison:
        print(comparison_line(config.task, result.comparison), file=sys.stderr)
    print(summary_line(result) + (f"; registered as {reference}" if reference else ""), file=sys.stderr)
    if not result.written:
        print(refusal(result), file=sys.stderr)
        return NOT_BETTER
    return 0


def comparison_line(task: str, comparison: dict) -> str:
    return (f"LoRA {headline(task, comparison['lora'])} in {comparison['lora_seconds']} s; full fine-tuning "
            f"{headline(task, comparison['full'])} in {comparison['full_seconds']} s; "
            f"LoRA / full {comparison['metric']}: {comparison['ratio']:.3f}")


def refusal(result: TrainResult) -> str:
    rows = result.after["examples"]
    return ("\n*** NOT WRITTEN: the adapter is no better than the base on the held-out rows, so it was neither "
            "written nor registered. ***\n"
            f"With {rows} held-out rows, one row is {100 / rows:.1f} points. Try more rows (or more held-out rows: "
            "--eval-data, --eval-fraction), more --epochs, another --learning-rate; or pass --force to write and "
            "register it anyway.")
