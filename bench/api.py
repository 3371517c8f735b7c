"""The figures of issue 21 in one run: structured output, logprobs and n > 1, embeddings.

    python -m bench.api [--quick] [--only structured,logprobs,embeddings]

Each part is its own module (`bench.api_structured`, `bench.api_logprobs`, `bench.api_embeddings`) that also
runs alone with its own options; this runs them one after another with their defaults (or `--quick`) and
ends with one JSON line of every part's figures.
"""

from __future__ import annotations

import argparse
import importlib
import json

PARTS = ("structured", "logprobs", "embeddings")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each part's --quick")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default: {PARTS})")
    args = parser.parse_args(argv)
    figures = {}
    for part in args.only.split(","):
        if part not in PARTS:
            parser.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
        print(f"== bench.api_{part}", flush=True)
        figures[part] = importlib.import_module(f"bench.api_{part}").main(["--quick"] if args.quick else [])
    print(json.dumps(figures, default=str))
    return figures


if __name__ == "__main__":
    main()
