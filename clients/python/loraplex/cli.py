"""The `loraplex` command: serve, classify, generate, health, and `adapters ...` management."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .adapters import AdapterInfo, ProgressBar
from .client import Client
from .errors import LoraplexError


def _client(args) -> Client:
    return Client(args.server, token=args.token, timeout=args.timeout, tls=args.tls, ca_cert=args.ca_cert)


def _classify(args) -> int:
    with _client(args) as client:
        for text, result in zip(args.texts, client.classify(args.texts, adapter=args.adapter), strict=True):
            print(f"{result.label}\t{result.score:.4f}\t{text}")
    return 0


def _generate(args) -> int:
    with _client(args) as client:
        for chunk in client.generate_stream(args.prompt, adapter=args.adapter, max_tokens=args.max_tokens,
                                            temperature=args.temperature, seed=args.seed):
            if chunk.finish_reason is None:
                print(chunk.text, end="", flush=True)
            else:
                print(f"\n[{chunk.finish_reason}: {chunk.prompt_tokens} prompt + {chunk.completion_tokens} "
                      "completion tokens]", file=sys.stderr)
    return 0


def _health(args) -> int:
    with _client(args) as client:
        status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1


def _upload(args) -> int:
    show = args.progress or (args.progress is None and sys.stderr.isatty())
    progress = ProgressBar(f"upload {args.name}", sys.stderr) if show else None
    with _client(args) as client:
        info = client.adapters.upload(args.path, name=args.name, labels=[x for x in args.labels.split(",") if x],
                                      metrics=json.loads(args.metrics) if args.metrics else None, progress=progress)
    print(f"uploaded {info.reference} ({info.task}, rank {info.rank}, {info.size_bytes} bytes)")
    return 0


def _row(info: AdapterInfo) -> str:
    return (f"{info.reference:<32} {info.task:<15} {info.rank:>4} {info.size_bytes:>12} {info.residency:<7} "
            f"{'pinned' if info.pinned else '':<6} {info.created}")


def _list(args) -> int:
    with _client(args) as client:
        adapters = client.adapters.list()
    print(f"{'ADAPTER':<32} {'TASK':<15} {'RANK':>4} {'BYTES':>12} {'WHERE':<7} {'':<6} CREATED")
    for info in adapters:
        print(_row(info))
    return 0


def _show(args) -> int:
    with _client(args) as client:
        info = client.adapters.get(args.adapter)
    print(json.dumps({**info.manifest, "residency": info.residency, "pinned": info.pinned}, indent=2))
    return 0


def _rm(args) -> int:
    with _client(args) as client:
        versions = client.adapters.delete(args.adapter)
    name = args.adapter.split("@")[0]
    print("deleted " + ", ".join(f"{name}@{v}" for v in versions))
    return 0


def _load(args) -> int:
    with _client(args) as client:
        print(_row(client.adapters.load(args.adapter, pin=args.pin)))
    return 0


def _unload(args) -> int:
    with _client(args) as client:
        print(_row(client.adapters.unload(args.adapter)))
    return 0


def _adapter_commands(commands) -> None:
    adapters = commands.add_parser("adapters", help="manage a server's adapters (admin token)")
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("publish", help="add an adapter to a local store (see `loraplex adapters publish --help`)")
    upload = actions.add_parser("upload", help="upload a PEFT folder or .tar/.tar.gz as the next version of NAME")
    upload.add_argument("path")
    upload.add_argument("--name", required=True)
    upload.add_argument("--labels", default="", help="comma-separated label names of a classification adapter")
    upload.add_argument("--metrics", default=None, help="training metrics to keep in the manifest, as JSON")
    upload.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when stderr is a terminal)")
    upload.set_defaults(run=_upload)
    actions.add_parser("list", help="every registered version").set_defaults(run=_list)
    for action, run, text in (("show", _show, "print a version's manifest (NAME is the latest)"),
                              ("rm", _rm, "delete NAME@VERSION, or every version of NAME"),
                              ("load", _load, "put an adapter into a device slot now"),
                              ("unload", _unload, "drop an adapter from the device (it stays registered)")):
        command = actions.add_parser(action, help=text)
        command.add_argument("adapter", help="NAME or NAME@VERSION")
        command.set_defaults(run=run)
        if action == "load":
            command.add_argument("--pin", action="store_true", help="never evict it")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server needs torch; the rest of the CLI must not import it
        from loraplex_server.serve import main as serve

        serve(argv[1:])
        return 0
    if argv[:1] == ["train"]:  # fine-tuning: torch, transformers, peft (the `train` extra)
        from loraplex_adapters.train_cli import main as train

        return train(argv[1:])
    if argv[:2] == ["adapters", "publish"]:  # validation reads the weights: torch again
        from loraplex_adapters.publish_cli import main as publish

        return publish(argv[2:])
    parser = argparse.ArgumentParser(prog="loraplex", description="loraplex client; `loraplex serve --help` for "
                                     "the server")
    parser.add_argument("--server", default=os.environ.get("LORAPLEX_SERVER", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("LORAPLEX_TOKEN"))
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--tls", action="store_true", default=bool(os.environ.get("LORAPLEX_TLS")))
    parser.add_argument("--ca-cert", default=os.environ.get("LORAPLEX_CA_CERT"),
                        help="PEM of a private CA (implies TLS)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="start the server (see `loraplex serve --help`)")
    commands.add_parser("train", help="fine-tune a LoRA adapter (see `loraplex train --help`)")
    _adapter_commands(commands)
    classify = commands.add_parser("classify", help="classify texts with a classification adapter")
    classify.add_argument("--adapter", required=True)
    classify.add_argument("texts", nargs="+")
    classify.set_defaults(run=_classify)
    generate = commands.add_parser("generate", help="stream a completion to stdout")
    generate.add_argument("--adapter", default=None)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("prompt")
    generate.set_defaults(run=_generate)
    commands.add_parser("health", help="print the server's health status").set_defaults(run=_health)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (LoraplexError, OSError, ValueError) as exc:  # ValueError: bad --metrics JSON
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
