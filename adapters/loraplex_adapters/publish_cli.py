"""`loraplex adapters publish PATH --name NAME --store DIR|s3://bucket/prefix`: validate an adapter and
commit it to a store, as the next version of NAME, without a server. Servers on that store
(`--adapter-dir DIR` or `--adapter-store s3://...`) serve it at their next lookup."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fingerprint import model_fingerprint
from .help_format import HelpFormatter
from .peft_folder import AdapterFormatError
from .s3_store import StoreUnavailable  # boto3 is imported only for an s3:// store
from .store_protocol import open_store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex adapters publish", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("path", help="a PEFT folder, or a .tar/.tar.gz of one")
    parser.add_argument("--name", required=True, help="the adapter's name; each publish adds a version")
    parser.add_argument("--store", required=True, help="the store: a folder (a server's --adapter-dir) or "
                        "s3://bucket/prefix (a server's --adapter-store; boto3 reads AWS_* settings as usual)")
    parser.add_argument("--labels", default="", help="comma-separated label names of a classification adapter, "
                        "in head order (default: none, for a generation adapter)")
    parser.add_argument("--base", default=None,
                        help="the base model folder the adapter was trained on; its fingerprint goes in the manifest "
                        "(default: none, the manifest names no base)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    fingerprint = model_fingerprint(Path(args.base)) if args.base else None
    try:
        store = open_store(args.store)
        manifest = store.publish(args.path, args.name, labels=[x for x in args.labels.split(",") if x],
                                 base_fingerprint=fingerprint)
    except (AdapterFormatError, OSError, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"published {manifest.name}@{manifest.version} ({manifest.extra['task']}, rank {manifest.extra['rank']})")
    return 0
