"""The example adapters that ship with loraplex (`example_adapters/<name>/`), trained by
`adapters/recipes/` on the embedded default base, and their publishing into a new store.

A server started on its default store publishes them when that folder does not exist yet, so the
README's examples work on the first start; a store that exists (even emptied) is never touched.
"""

from __future__ import annotations

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
