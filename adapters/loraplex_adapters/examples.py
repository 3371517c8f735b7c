"""The example adapters that ship with loraplex (`example_adapters/<name>/`), trained by
`adapters/recipes/` on the embedded default base, and their publishing into a new store.

A server started on its default store publishes them when that folder does not exist yet, so the
README's examples work on the first start; a store that exists (even emptied) is never touched.
`python -m loraplex_adapters.examples --store DIR` publishes them into another new store (the Docker
image's, at build time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .manifest import Manifest, read_manifest
from .store_protocol import AdapterStoreLike

EXAMPLES_DIR = Path(__file__).parent / "example_adapters"
EXAMPLE_NAMES = ("sentiment", "topic", "replies")


def example_manifests() -> list[tuple[Path, Manifest]]:
    """(folder, manifest) of each shipped example that is present."""
    return [(EXAMPLES_DIR / name, read_manifest(EXAMPLES_DIR / name)) for name in EXAMPLE_NAMES
            if (EXAMPLES_DIR / name).is_dir()]


def publish_examples(store: AdapterStoreLike, base_fingerprint: str) -> list[Manifest]:
    """Publish every shipped example trained on this base (the fingerprint); returns what was published."""
    published = []
    for folder, shipped in example_manifests():
        if shipped.extra.get("base_fingerprint") != base_fingerprint:
            continue
        published.append(store.publish(folder, shipped.name, labels=shipped.labels, base_fingerprint=base_fingerprint,
                                       metrics=shipped.extra.get("metrics")))
    return published


def main(argv: list[str] | None = None) -> int:
    """Publish the examples into a new store for the embedded default base."""
    parser = argparse.ArgumentParser(prog="python -m loraplex_adapters.examples", description=main.__doc__)
    parser.add_argument("--store", required=True, help="a folder that does not exist yet, or s3://bucket/prefix")
    args = parser.parse_args(argv)
    from .embedded_base import embedded_default_path
    from .fingerprint import model_fingerprint
    from .store_protocol import is_s3, open_store

    if not is_s3(args.store) and Path(args.store).exists() and any(Path(args.store).iterdir()):
        print(f"{args.store} is not empty; the examples go only into a new store", file=sys.stderr)
        return 2
    fingerprint = model_fingerprint(embedded_default_path())
    published = publish_examples(open_store(args.store, base_fingerprint=fingerprint), fingerprint)
    print("published", ", ".join(f"{m.name}@{m.version}" for m in published) or "nothing", "into", args.store)
    return 0 if published else 1


if __name__ == "__main__":
    sys.exit(main())
