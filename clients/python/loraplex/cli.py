"""The `loraplex` command: serve, classify, embed, generate, chat, health, base, and `adapters ...` management.

The client commands are the SDK's own. `serve`, `train`, `adapters publish` and `base` belong to the server
and training extras: each is found by name only when it runs (COMMANDS), so the SDK imports neither the
server nor the trainer, and says which extra to install when one is missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .adapters import AdapterInfo, ProgressBar
from .cli_chat import add_chat_options, run_chat
from .cli_options import HelpFormatter, add_connection, add_sampling, connection_defaults, sampling_kwargs
from .client import Client
from .errors import LoraplexError

LABELS_HINT = ("pass the classification head's label names, in head order, with --labels "
               "(e.g. --labels negative,neutral,positive)")


def _client(args) -> Client:
    return Client(args.server, token=args.token, timeout=args.timeout, tls=args.tls, ca_cert=args.ca_cert)


def _classify(args) -> int:
    with _client(args) as client:
        for text, result in zip(args.texts, client.classify(args.texts, adapter=args.adapter), strict=True):
            print(f"{result.label}\t{result.score:.4f}\t{text}")
    return 0


def _embed(args) -> int:
    with _client(args) as client:
        result = client.embed(args.texts, adapter=args.adapter, truncate=args.truncate)
    for text, vector in zip(args.texts, result.vectors, strict=True):
        if args.json:
            print(json.dumps(vector))
        else:
            head = ", ".join(f"{v:+.4f}" for v in vector[:4])
            print(f"{len(vector)}\t[{head}, ...]\t{text}")
    return 0


def _generate(args) -> int:
    with _client(args) as client:
        for chunk in client.generate_stream(args.prompt, adapter=args.adapter, **sampling_kwargs(args)):
            if chunk.finish_reason is None:
                print(chunk.text, end="", flush=True)
            else:
                print(f"\n[{chunk.finish_reason}: {chunk.prompt_tokens} prompt + {chunk.completion_tokens} "
                      "completion tokens]", file=sys.stderr)
    return 0


def _chat(args) -> int:
    with _client(args) as client:
        return run_chat(client, args)


def _health(args) -> int:
    with _client(args) as client:
        status = client.health()
    print(status)
    return 0 if status else 1


def _upload(args) -> int:
    show = args.progress or (args.progress is None and sys.stderr.isatty())
    progress = ProgressBar(f"upload {args.name}", sys.stderr) if show else None
    labels = [x for x in args.labels.split(",") if x]
    with _client(args) as client:
        try:
            info = client.adapters.upload(args.path, name=args.name, labels=labels,
                                          metrics=json.loads(args.metrics) if args.metrics else None,
                                          progress=progress)
        except LoraplexError as exc:
            if not labels and "label names" in exc.details:
                raise LoraplexError(exc.code, f"{exc.details}; {LABELS_HINT}") from None
            raise
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


def _elsewhere(args) -> int:
    print(f"error: `loraplex {args.elsewhere}` takes its own options after it: see `loraplex {args.elsewhere} "
          "--help`", file=sys.stderr)
    return 2


def _command(commands, name: str, text: str, connection: bool = True) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
    if connection:
        add_connection(parser)
    return parser


def _adapter_commands(commands) -> None:
    adapters = _command(commands, "adapters", "manage a server's adapters (admin token)")
    actions = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("publish", help="add an adapter to a local store (see `loraplex adapters publish --help`)",
                       add_help=False).set_defaults(run=_elsewhere, elsewhere="adapters publish")
    upload = _command(actions, "upload", "upload a PEFT folder or .tar/.tar.gz as the next version of NAME")
    upload.add_argument("path", help="a PEFT folder, or a .tar/.tar.gz of one")
    upload.add_argument("--name", required=True, help="the adapter's name; each upload adds a version")
    upload.add_argument("--labels", default="", help="comma-separated label names of a classification adapter, "
                        "in head order (default: none, for a generation adapter)")
    upload.add_argument("--metrics", default=None, help="training metrics to keep in the manifest, as JSON "
                        "(default: none)")
    upload.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when stderr is a terminal)")
    upload.set_defaults(run=_upload)
    _command(actions, "list", "every registered version").set_defaults(run=_list)
    for action, run, text in (("show", _show, "print a version's manifest (NAME is the latest)"),
                              ("rm", _rm, "delete NAME@VERSION, or every version of NAME"),
                              ("load", _load, "put an adapter into a device slot now"),
                              ("unload", _unload, "drop an adapter from the device (it stays registered)")):
        command = _command(actions, action, text)
        command.add_argument("adapter", help="NAME or NAME@VERSION")
        command.set_defaults(run=run)
        if action == "load":
            command.add_argument("--pin", action="store_true", help="never evict it")


def _inference_commands(commands) -> None:
    classify = _command(commands, "classify", "classify texts with a classification adapter")
    classify.add_argument("--adapter", required=True, help="NAME or NAME@VERSION")
    classify.add_argument("texts", nargs="+", help="texts to classify, one result line each")
    classify.set_defaults(run=_classify)
    embed = _command(commands, "embed", "print the embedding of each text (its size and first values, or --json)")
    embed.add_argument("--adapter", default=None, help="NAME or NAME@VERSION (default: the base model)")
    embed.add_argument("--truncate", action="store_true", help="cut texts past the model's embedding length "
                       "(default: refuse them)")
    embed.add_argument("--json", action="store_true", help="print each whole embedding as a JSON list, one a line")
    embed.add_argument("texts", nargs="+", help="texts to embed, one result line each")
    embed.set_defaults(run=_embed)
    generate = _command(commands, "generate", "stream a completion of PROMPT to stdout")
    generate.add_argument("--adapter", default=None, help="NAME or NAME@VERSION (default: the base model)")
    add_sampling(generate, max_tokens=64)
    generate.add_argument("prompt", help="raw text to continue (no chat template; see `loraplex chat`)")
    generate.set_defaults(run=_generate)
    chat = _command(commands, "chat", "chat with a generation adapter; the server applies the chat template")
    add_chat_options(chat)
    add_sampling(chat, max_tokens=256)
    chat.set_defaults(run=_chat)
    _command(commands, "health", "print the server's health; exit 0 only when SERVING").set_defaults(run=_health)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", formatter_class=HelpFormatter,
                                     description="loraplex client. Connection options go before or after the "
                                     "subcommand; `loraplex serve --help` for the server.")
    add_connection(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("serve", "start the server (see `loraplex serve --help`)"),
                       ("train", "fine-tune a LoRA adapter (see `loraplex train --help`)"),
                       ("base", "the embedded base model's Hugging Face folder: `base path`, `base export DIR`")):
        commands.add_parser(name, help=text, add_help=False).set_defaults(run=_elsewhere, elsewhere=name)
    _inference_commands(commands)
    _adapter_commands(commands)
    return parser


# Commands of the server and training extras: (module, function, the extra that brings them).
COMMANDS = {
    ("serve",): ("loraplex_server.app.serve", "main", "server"),
    ("train",): ("loraplex_adapters.train_cli", "main", "train"),
    ("adapters", "publish"): ("loraplex_adapters.publish_cli", "main", "server"),
    ("base",): ("loraplex_adapters.base_cli", "main", "server"),
}


def _extra_command(words: tuple[str, ...]):
    """The function of an extra's command, imported now; SystemExit naming the extra when it is missing."""
    module, function, extra = COMMANDS[words]
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as exc:
        raise SystemExit(f"error: `loraplex {' '.join(words)}` needs the {extra} extra ({exc.name} is not "
                         f"installed): pip install 'loraplex[{extra}]'") from None


def _upload_trained(server: str, token: str | None, folder, name: str, labels: list[str], metrics: dict,
                    base_fingerprint: str) -> str:
    """`loraplex train --register SERVER`: the trainer hands its adapter here, to the SDK's upload."""
    with Client(server, token=token) as client:
        return client.adapters.upload(folder, name=name, labels=labels, metrics=metrics,
                                      base_fingerprint=base_fingerprint).reference


def _run_extra(words: tuple[str, ...], argv: list[str]) -> int:
    command = _extra_command(words)
    try:
        code = command(argv, upload=_upload_trained) if words == ("train",) else command(argv)
    except LoraplexError as exc:  # a refused upload of `train --register`
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for words in COMMANDS:  # torch and the server's packages: imported only by the command that needs them
        if tuple(argv[:len(words)]) == words:
            return _run_extra(words, argv[len(words):])
    args = build_parser().parse_args(argv)
    connection_defaults(args)
    try:
        return args.run(args)
    except (LoraplexError, OSError, ValueError) as exc:  # ValueError: bad --metrics
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
