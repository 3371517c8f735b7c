"""Option groups shared by the CLI's client subcommands, and the help formatter that shows defaults."""

from __future__ import annotations

import argparse
import os

CONNECTION_ENV = {"server": ("LORAPLEX_SERVER", "127.0.0.1:50051"), "token": ("LORAPLEX_TOKEN", None),
                  "tls": ("LORAPLEX_TLS", False), "ca_cert": ("LORAPLEX_CA_CERT", None)}
DEFAULT_TIMEOUT = 60.0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says it or there is no meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "(default" in text:
            return text
        return super()._get_help_string(action)


def add_connection(parser: argparse.ArgumentParser) -> None:
    """Connection flags, accepted before and after the subcommand: SUPPRESS defaults mean a flag given after
    the subcommand wins, and one given before survives; connection_defaults() fills in the rest."""
    group = parser.add_argument_group("connection")
    group.add_argument("--server", default=argparse.SUPPRESS, metavar="HOST:PORT",
                       help="the server (default: $LORAPLEX_SERVER, else 127.0.0.1:50051)")
    group.add_argument("--token", default=argparse.SUPPRESS,
                       help="bearer token (default: $LORAPLEX_TOKEN, else none)")
    group.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                       help=f"deadline of each call (default: {DEFAULT_TIMEOUT:g})")
    group.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                       help="connect over TLS (default: on if $LORAPLEX_TLS is set)")
    group.add_argument("--ca-cert", default=argparse.SUPPRESS, metavar="PEM",
                       help="PEM of a private CA; implies --tls (default: $LORAPLEX_CA_CERT, else the system's)")


def connection_defaults(args: argparse.Namespace) -> None:
    for name, (variable, default) in CONNECTION_ENV.items():
        if not hasattr(args, name):
            value = os.environ.get(variable, default)
            setattr(args, name, bool(value) if isinstance(default, bool) else value)
    if not hasattr(args, "timeout"):
        args.timeout = DEFAULT_TIMEOUT


def add_sampling(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """Every sampling option of the SDK's generate and chat."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass")
    group.add_argument("--top-k", type=int, default=0, help="keep only the k likeliest tokens (0: all)")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="end the output before this text (repeatable; default: none)")
    group.add_argument("--seed", type=int, default=None,
                       help="seed for reproducible sampling (default: a fresh one per request)")
    constraint = parser.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", type=_json_file, default=None, metavar="FILE",
                            help="the output is JSON valid against the JSON schema in FILE (default: none)")
    constraint.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    constraint.add_argument("--regex", default=None,
                            help="the whole output matches this regular expression (default: none)")
    constraint.add_argument("--choice", action="append", default=None, metavar="TEXT",
                            help="the output is exactly one of these texts (repeatable; default: none)")


def _json_file(path: str) -> str:
    """The text of a JSON file (argparse reports the ValueError as a usage error)."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "stop": args.stop, "seed": args.seed, "json_schema": args.json_schema,
            "json_object": args.json_object, "regex": args.regex, "choice": args.choice}
