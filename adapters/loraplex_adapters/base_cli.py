"""`loraplex base path|export DIR`: the embedded base model's Hugging Face folder, for training with PEFT.
(A command of the server extra: converting the shipped GGUF needs torch, transformers and gguf.)"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .embedded_base import CACHE_NAME, EmbeddedModelMissing, cache_root, embedded_default_path
from .help_format import HelpFormatter


class BaseUnavailable(Exception):
    pass


def embedded_base_folder() -> Path:
    """The safetensors folder of the embedded base, converted from its GGUF on first use (as the server does)."""
    if not (cache_root() / CACHE_NAME / "config.json").is_file():
        print("converting the embedded base model to a safetensors folder (once; takes seconds)", file=sys.stderr)
    try:
        return embedded_default_path()
    except EmbeddedModelMissing as exc:
        raise BaseUnavailable(str(exc)) from None


def export(target: Path) -> Path:
    """Copy the folder to `target`, which must not exist or be an empty folder."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BaseUnavailable(f"{target} already exists and is not an empty folder; choose a new one")
    source = embedded_base_folder()
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex base", formatter_class=HelpFormatter,
                                     description="the embedded base model's Hugging Face folder")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("path", help="print the folder (converted from the shipped GGUF on first use)",
                       formatter_class=HelpFormatter)
    export_command = actions.add_parser("export", help="copy the folder to DIR", formatter_class=HelpFormatter)
    export_command.add_argument("dir", metavar="DIR", help="a new or empty folder")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(embedded_base_folder() if args.action == "path" else export(Path(args.dir)))
    except (BaseUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
