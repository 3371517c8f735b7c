"""`loraplex adapters publish PATH --name NAME --store DIR`: validate an adapter and commit it to a
local store, as the next version of NAME. A server started with `--adapter-dir DIR` serves it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fingerprint import model_fingerprint
from .peft_folder import AdapterFormatError
from .store import AdapterStore


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loraplex adapters publish", description=__doc__)
    parser.add_argument("path", help="a PEFT folder, or a .tar/.tar.gz of one")
    parser.add_argument("--name", required=True)
    parser.add_argument("--store", required=True, help="the store folder (the server's --adapter-dir)")
    parser.add_argument("--labels", default="", help="comma-separated label names of a classification adapter")
    parser.add_argument("--base", default=None,
                        help="the base model folder the adapter was trained on; its fingerprint goes in the manifest")
    args = parser.parse_args(argv)
    fingerprint = model_fingerprint(Path(args.base)) if args.base else None
    store = AdapterStore(args.store)
    try:
        manifest = store.publish(args.path, args.name, labels=[x for x in args.labels.split(",") if x],
                                 base_fingerprint=fingerprint)
    except (AdapterFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"published {manifest.name}@{manifest.version} ({manifest.extra['task']}, rank {manifest.extra['rank']})")
    return 0
