"""`loraplex chat`: a conversation with a generation adapter, one-shot (-m) or read line by line from stdin."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from .cli_options import sampling_kwargs
from .client import Client

EXIT_COMMAND = "/exit"


def stdin_turns() -> Iterator[str]:
    """User turns from stdin until EOF or /exit; a prompt on stderr when a person types them."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == EXIT_COMMAND:
            return
        if line.strip():
            yield line.rstrip("\n")


def stream_reply(client: Client, history: list[dict], args: argparse.Namespace) -> str:
    """Print the assistant's answer as it streams; return its full text."""
    parts = []
    for chunk in client.chat_stream(history, adapter=args.adapter, **sampling_kwargs(args)):
        if chunk.finish_reason is None:
            parts.append(chunk.text)
            print(chunk.text, end="", flush=True)
        elif chunk.finish_reason == "length":
            print(f"\n[cut at {chunk.completion_tokens} tokens: raise --max-tokens]", end="", file=sys.stderr)
    print(flush=True)
    return "".join(parts)


def run_chat(client: Client, args: argparse.Namespace) -> int:
    history = [{"role": "system", "content": args.system}] if args.system else []
    for text in args.message or stdin_turns():
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": stream_reply(client, history, args)})
    return 0


def add_chat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default=None, help="NAME or NAME@VERSION of a generation adapter "
                        "(default: the base model)")
    parser.add_argument("-m", "--message", action="append", default=None, metavar="TEXT",
                        help="a user turn, answered in order, then exit; repeatable (default: read turns from "
                        f"stdin until EOF or {EXIT_COMMAND})")
    parser.add_argument("--system", default=None, help="a system message that opens the conversation "
                        "(default: none)")
