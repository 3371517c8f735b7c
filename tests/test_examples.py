"""The shipped example adapters: publishable as they are, and only onto the base they were trained on."""

from __future__ import annotations

from loraplex_adapters.examples import EXAMPLE_NAMES, example_manifests, publish_examples
from loraplex_adapters.store import AdapterStore


def test_every_example_ships_with_its_manifest():
    shipped = {manifest.name: manifest for _, manifest in example_manifests()}
    assert sorted(shipped) == sorted(EXAMPLE_NAMES)
    assert shipped["sentiment"].labels == ["negative", "neutral", "positive"]
    assert len(shipped["topic"].labels) == 5 and shipped["replies"].labels == []
    assert {m.extra["task"] for m in shipped.values()} == {"classification", "generation"}
    everyday = shipped["sentiment"].extra["metrics"]["held_out"]["everyday"]
    assert everyday["examples"] == 60


def test_examples_publish_onto_their_base_with_their_labels_and_metrics(tmp_path):
    (_, first), *_ = example_manifests()
    fingerprint = first.extra["base_fingerprint"]
    store = AdapterStore(tmp_path / "store", base_fingerprint=fingerprint)
    published = publish_examples(store, fingerprint)
    assert sorted(m.name for m in published) == sorted(EXAMPLE_NAMES)
    for _, shipped in example_manifests():
        stored = store.lookup(shipped.name)
        assert (stored.version, stored.labels) == (1, shipped.labels)
        assert stored.extra["metrics"] == shipped.extra["metrics"]
        assert stored.extra["task"] == shipped.extra["task"]


def test_examples_stay_out_of_a_store_on_another_base(tmp_path):
    store = AdapterStore(tmp_path / "store", base_fingerprint="sha256:another-base")
    assert publish_examples(store, "sha256:another-base") == []
    assert store.list() == []
