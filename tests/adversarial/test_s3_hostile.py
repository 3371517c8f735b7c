"""Hostile objects in an S3 store (issue 19, classes 2 and 10), against moto's real S3 server: weights
rewritten in the bucket or in a replica's local copy after publish, an unreadable manifest, and keys and
claims spelling version numbers outside the rule (manifest.VERSION_RULE)."""

from __future__ import annotations

import json

import pytest
import torch
from hostile_versions import NOT_VERSIONS
from moto_s3 import BUCKET, keys, moto_s3_server
from safetensors.torch import load, load_file, save

from loraplex_adapters.manifest import MAX_VERSION
from loraplex_adapters.s3_store import S3AdapterStore
from loraplex_adapters.store import AdapterNotInStore, AdapterQuarantined, VersionsExhausted

GEN = "gen_qv_r4"
WEIGHTS, MANIFEST = "adapter_model.safetensors", "loraplex.json"


@pytest.fixture(scope="module")
def s3():
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def prefix(request, s3):
    return f"s3://{BUCKET}/{request.node.name}"


@pytest.fixture
def source(tiny):
    return tiny("llama")[1][GEN][0]


def key(prefix: str, *parts: object) -> str:
    return "/".join([prefix.removeprefix(f"s3://{BUCKET}/"), *map(str, parts)])


def get(s3, prefix: str, *parts: object) -> bytes:
    return s3[0].get_object(Bucket=BUCKET, Key=key(prefix, *parts))["Body"].read()


def put(s3, prefix: str, *parts: object, body: bytes) -> None:
    s3[0].put_object(Bucket=BUCKET, Key=key(prefix, *parts), Body=body)


def copy_version(s3, prefix: str, folder: str, version: object) -> None:
    """Copy replies@1's objects to adapters/replies/<folder>/, its manifest naming `version`."""
    for name in keys(s3[0], prefix):
        if name.startswith("adapters/replies/1/"):
            body = get(s3, prefix, name)
            if name.endswith(MANIFEST):
                body = json.dumps({**json.loads(body), "version": version}).encode()
            put(s3, prefix, "adapters", "replies", folder, name.rsplit("/", 1)[-1], body=body)


def other_weights(data: bytes) -> bytes:
    """A valid safetensors file like `data`, one value changed."""
    tensors = load(data)
    tensors[sorted(tensors)[0]].view(-1)[0] += 1
    return save(tensors)


def test_weights_rewritten_in_the_bucket_after_publish_are_quarantined(s3, prefix, source, tmp_path, caplog):
    S3AdapterStore(prefix).publish(source, "replies")
    S3AdapterStore(prefix).publish(source, "replies")
    put(s3, prefix, "adapters", "replies", 2, WEIGHTS, body=other_weights(get(s3, prefix, "adapters/replies/2",
                                                                                WEIGHTS)))
    reader = S3AdapterStore(prefix, cache_dir=tmp_path / "cache")
    assert reader.lookup("replies").version == 2  # the manifest still commits it
    with caplog.at_level("WARNING", logger="loraplex_adapters.s3_store"):
        with pytest.raises(AdapterQuarantined, match="replies@2 is damaged.*sha256"):
            reader.load("replies", 2)
    assert any("quarantined" in r.getMessage() for r in caplog.records)
    other = S3AdapterStore(prefix)
    assert [m.version for m in other.list()] == [1], "every replica stops serving it"
    with pytest.raises(AdapterNotInStore):
        other.load("replies", 2)
    assert any(k.startswith("quarantine/replies-2-") and k.endswith(WEIGHTS) for k in keys(s3[0], prefix))
    assert other.load("replies")[0].version == 1
    assert other.publish(source, "replies").version == 3, "the quarantined number is never reused"


def test_a_local_copy_rewritten_after_download_is_fetched_again(s3, prefix, source, tmp_path):
    S3AdapterStore(prefix).publish(source, "replies")
    reader = S3AdapterStore(prefix, cache_dir=tmp_path / "cache")
    _, folder = reader.resolve("replies")
    (folder / WEIGHTS).write_bytes(other_weights((folder / WEIGHTS).read_bytes()))
    manifest, adapter = reader.load("replies")
    expected = load_file(source / WEIGHTS)
    module = sorted(adapter.modules)[0]
    published = expected[next(k for k in expected if f"{module}.lora_A" in k)]
    torch.testing.assert_close(adapter.modules[module].A, published, rtol=0, atol=0)
    assert [m.version for m in S3AdapterStore(prefix).list()] == [1], "the bucket's copy was fine: nothing quarantined"


def test_an_unreadable_manifest_is_quarantined_once(s3, prefix, source, caplog):
    S3AdapterStore(prefix).publish(source, "replies")
    copy_version(s3, prefix, "2", 2)
    put(s3, prefix, "adapters", "replies", 2, MANIFEST, body=b"{oops")
    with caplog.at_level("WARNING", logger="loraplex_adapters.s3_store"):
        store = S3AdapterStore(prefix, refresh_seconds=0)
        for _ in range(3):
            assert [m.version for m in store.list()] == [1]
    assert len([r for r in caplog.records if "quarantined" in r.getMessage()]) == 1
    assert not any(k.startswith("adapters/replies/2/") for k in keys(s3[0], prefix))


def test_keys_spelling_any_other_version_are_ignored(s3, prefix, source):
    S3AdapterStore(prefix).publish(source, "replies")
    for text in NOT_VERSIONS:
        if text and "\n" not in text:  # moto refuses a key with a newline
            copy_version(s3, prefix, text, 5)
            put(s3, prefix, "claims", "replies", text, body=b"")
    store = S3AdapterStore(prefix)
    assert [(m.name, m.version) for m in store.list()] == [("replies", 1)]
    assert store.publish(source, "replies").version == 2
    assert store.sweep(max_age=0) == []  # nothing of theirs is the sweep's to judge
    assert [m.version for m in S3AdapterStore(prefix).list()] == [1, 2]


def test_the_highest_version_is_served_and_then_publish_is_refused(s3, prefix, source):
    S3AdapterStore(prefix).publish(source, "replies")
    copy_version(s3, prefix, str(MAX_VERSION), MAX_VERSION)
    put(s3, prefix, "claims", "replies", MAX_VERSION, body=b"")
    store = S3AdapterStore(prefix)
    assert [m.version for m in store.list()] == [1, MAX_VERSION]
    assert store.load("replies")[0].version == MAX_VERSION
    with pytest.raises(VersionsExhausted, match="used every version number up to 999999999"):
        store.publish(source, "replies")
    assert [m.version for m in S3AdapterStore(prefix).list()] == [1, MAX_VERSION]
