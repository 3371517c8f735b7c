"""The `loraplex` command: serve, classify, generate, health."""

from __future__ import annotations

import argparse
import os
import sys

from .client import Client, LoraplexError


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server needs torch; the rest of the CLI must not import it
        from loraplex_server.serve import main as serve

        serve(argv[1:])
        return 0
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
    adapters = commands.add_parser("adapters", help="manage adapters")
    adapters.add_subparsers(dest="action", required=True).add_parser(
        "publish", help="add an adapter to a local store (see `loraplex adapters publish --help`)")
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
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
