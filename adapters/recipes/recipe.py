"""What the three example recipes share: a command line, training, registering, a results line."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from loraplex import Client
from loraplex_adapters.train_cli import comparison_line, register
from loraplex_adapters.trainer import TrainConfig, summary_line, train


def upload(server: str, token: str | None, folder, name: str, labels: list[str], metrics: dict,
           base_fingerprint: str) -> str:
    """`--register SERVER`: the recipes upload through the SDK (the trainer itself imports no client)."""
    with Client(server, token=token) as client:
        return client.adapters.upload(folder, name=name, labels=labels, metrics=metrics,
                                      base_fingerprint=base_fingerprint).reference


def parser(description: str, name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--output", default=f"adapters/trained/{name}", help="work folder: data, checkpoints, adapter")
    p.add_argument("--name", default=name)
    p.add_argument("--base", default=None, help="local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", default=None, help="publish into this local store (a server's --adapter-dir)")
    p.add_argument("--register", metavar="SERVER", default=None, help="upload to this server")
    p.add_argument("--token", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compare-full", action="store_true",
                   help="also fine-tune every weight of the base on the same split and print LoRA / full")
    return p


def classification_parser(description: str, name: str) -> argparse.ArgumentParser:
    p = parser(description, name)
    p.add_argument("--per-class", type=int, default=None,
                   help="train on this many rows of each label, a subsample (default: the recipe's; same held-out "
                        "rows)")
    return p


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def balanced(rows: list[dict], key: str, per_class: int, rng: random.Random) -> list[dict]:
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row[key], []).append(row)
    picked = []
    for label in sorted(by_class):
        group = by_class[label][:]
        rng.shuffle(group)
        picked += group[:per_class]
    rng.shuffle(picked)
    return picked


def balanced_split(rows: list[dict], per_class: int, held_per_class: int, seed: int
                   ) -> tuple[list[dict], list[dict]]:
    """Up to `per_class` rows of each label, `held_per_class` of them held out; no text in both."""
    rows = balanced(rows, "label", per_class, random.Random(seed))
    held = balanced(rows, "label", held_per_class, random.Random(seed + 1))
    held_texts = {r["text"] for r in held}
    return [r for r in rows if r["text"] not in held_texts], held


def subsample(rows: list[dict], per_class: int | None, seed: int) -> list[dict]:
    """At most `per_class` training rows of each label (all when None), drawn with the recipe's seed."""
    return rows if per_class is None else balanced(rows, "label", per_class, random.Random(seed))


def run(args, train_rows: list[dict], eval_rows: list[dict], **settings) -> dict:
    """Train on the rows, evaluate on the held-out ones, register; returns the summary it prints."""
    output = Path(args.output)
    config = TrainConfig(data=write_jsonl(output / "data" / "train.jsonl", train_rows),
                         eval_data=write_jsonl(output / "data" / "eval.jsonl", eval_rows), output=str(output),
                         name=args.name, base=args.base, seed=args.seed, compare_full=args.compare_full,
                         **settings)
    if args.epochs:
        config.epochs = args.epochs
    started = time.perf_counter()
    result = train(config, progress=not args.no_progress)
    if not result.written:
        raise SystemExit(f"{args.name}: {summary_line(result)}")
    reference = register(result, args.register, args.store, args.token, upload)
    summary = {"adapter": args.name, "registered": reference, "train_rows": len(train_rows),
               "eval_rows": len(eval_rows), "seconds": round(time.perf_counter() - started),
               "best_epoch": result.best_epoch, "stopped_early": result.stopped_early, "before": result.before,
               "after": result.after, "held_out": result.held_out, "compare_full": result.comparison}
    print(json.dumps(summary))
    if result.comparison:
        print(comparison_line(config.task, result.comparison), file=sys.stderr)
    print(summary_line(result), file=sys.stderr)
    return summary
