"""The S3 adapter store against moto's real S3 server on 127.0.0.1: atomic publish, distinct versions
under concurrency, killed publishers, the sweep, two replicas on one bucket, and a real server on it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from moto_s3 import BUCKET, keys, moto_s3_server
from server_process import free_port, start_server

from loraplex import NotFound
from loraplex_adapters.fingerprint import file_sha256
from loraplex_adapters.s3_store import S3AdapterStore, StoreUnavailable
from loraplex_adapters.store import AdapterNotInStore
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

CLS, GEN = "cls3_r2", "gen_qv_r4"
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def s3():
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def prefix(request):
    return f"s3://{BUCKET}/{request.node.name}"


@pytest.fixture(scope="module")
def sources(tiny):
    return {name: folder for name, (folder, _) in tiny("llama")[1].items()}


def test_publish_then_resolve_downloads_the_same_files(s3, prefix, sources, tmp_path):
    publisher, reader = S3AdapterStore(prefix), S3AdapterStore(prefix, cache_dir=tmp_path / "cache")
    manifest = publisher.publish(sources[CLS], "sentiment", labels=LABELS)
    assert (manifest.name, manifest.version, manifest.extra["task"]) == ("sentiment", 1, "classification")
    got, folder = reader.resolve("sentiment")
    assert (got.version, got.labels, got.extra["sha256"]) == (1, LABELS, manifest.extra["sha256"])
    assert folder.is_relative_to(tmp_path / "cache")
    for source_file in Path(sources[CLS]).iterdir():
        assert file_sha256(folder / source_file.name) == file_sha256(source_file)
    files = sorted([p.name for p in Path(sources[CLS]).iterdir()] + ["loraplex.json"])
    assert keys(s3[0], prefix) == [f"adapters/sentiment/1/{f}" for f in files] + ["claims/sentiment/1"]
    assert [(m.name, m.version) for m in reader.list()] == [("sentiment", 1)]
    with pytest.raises(AdapterNotInStore):
        reader.resolve("sentiment", 2)
    with pytest.raises(ValueError, match="label names"):  # the folder store's refusals, unchanged
        publisher.publish(sources[CLS], "unlabelled")
    assert not reader.has("unlabelled") and not any("unlabelled" in k for k in keys(s3[0], prefix))


def test_eight_concurrent_publishes_get_eight_distinct_versions(s3, prefix, sources):
    stores = [S3AdapterStore(prefix) for _ in range(4)]  # four "replicas", two publishes each
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda i: stores[i % 4].publish(sources[GEN], "busy").version, range(8)))
    assert sorted(versions) == list(range(1, 9))
    assert [m.version for m in S3AdapterStore(prefix).list()] == list(range(1, 9))


def test_a_killed_publisher_leaves_no_version_and_the_sweep_removes_its_files(s3, prefix, sources):
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from loraplex_adapters.s3_store import S3AdapterStore
        class Dying(S3AdapterStore):
            def _before_commit(self, manifest):
                os._exit(17)  # the files are up, the manifest never will be
        Dying({prefix!r}).publish({str(sources[GEN])!r}, "halfway")
    """)], capture_output=True, text=True, timeout=120, env=os.environ)
    assert killed.returncode == 17, killed.stderr
    orphans = [k for k in keys(s3[0], prefix) if k.startswith("adapters/halfway/1/")]
    assert orphans == [f"adapters/halfway/1/{p.name}" for p in sorted(Path(sources[GEN]).iterdir())]
    store = S3AdapterStore(prefix)  # opening sweeps too, but only orphans older than an hour
    assert not store.has("halfway") and store.list() == []
    with pytest.raises(AdapterNotInStore):
        store.resolve("halfway", 1)
    assert sorted(store.sweep(max_age=0)) == [f"{prefix.removeprefix(f's3://{BUCKET}/')}/{k}" for k in orphans]
    assert keys(s3[0], prefix) == ["claims/halfway/1"], "the highest claim stays: numbers are never reused"
    assert store.publish(sources[GEN], "halfway").version == 2


def test_a_publish_and_a_delete_reach_the_other_replica_without_restart(s3, prefix, sources):
    first, second = S3AdapterStore(prefix), S3AdapterStore(prefix, refresh_seconds=0.5)
    assert not second.has("shared") and second.list() == []
    first.publish(sources[GEN], "shared")
    assert second.resolve("shared")[0].version == 1  # a miss re-lists at once
    first.publish(sources[GEN], "shared")
    assert second.resolve("shared", 2)[0].version == 2
    assert first.delete("shared", 1) == [1]
    wait_until_gone(second, "shared", 1)  # within refresh_seconds, not at once
    assert second.resolve("shared")[0].version == 2
    assert first.delete("shared") == [2]
    wait_until_gone(second, "shared", 2)
    assert not second.has("shared") and second.list() == []
    with pytest.raises(AdapterNotInStore):
        first.delete("shared")
    assert first.publish(sources[GEN], "shared").version == 3, "a deleted number is never reused"


def wait_until_gone(store: S3AdapterStore, name: str, version: int) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            store.resolve(name, version)
        except AdapterNotInStore:
            return
        time.sleep(0.1)
    pytest.fail(f"{name}@{version} still resolves 30 s after its delete")


def test_the_publish_command_commits_into_s3_and_names_a_missing_bucket(s3, prefix, sources, capsys):
    from loraplex.cli import main as cli_main

    assert cli_main(["adapters", "publish", str(sources[CLS]), "--name", "offline", "--labels", ",".join(LABELS),
                     "--store", prefix]) == 0
    assert "published offline@1" in capsys.readouterr().out
    assert S3AdapterStore(prefix).resolve("offline")[0].labels == LABELS
    assert cli_main(["adapters", "publish", str(sources[CLS]), "--name", "offline", "--labels", ",".join(LABELS),
                     "--store", "s3://no-such-bucket/p"]) == 2
    error = capsys.readouterr().err
    assert "no-such-bucket" in error and "Traceback" not in error


def test_a_missing_bucket_is_refused_with_a_message(s3):
    with pytest.raises(StoreUnavailable, match="no-such-bucket"):
        S3AdapterStore("s3://no-such-bucket/x")


@pytest.fixture(scope="module")
def reference(tiny):
    base_dir, adapters = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=4)
    engine.load_adapter(CLS, adapters[CLS][0], labels=LABELS)
    engine.load_adapter(GEN, adapters[GEN][0])
    return engine


def test_a_server_on_the_s3_store_serves_publishes_from_elsewhere_and_uploads_into_it(
        s3, tiny, sources, reference, tmp_path):
    prefix = f"s3://{BUCKET}/served"
    outside = S3AdapterStore(prefix)
    outside.publish(sources[CLS], "sentiment", labels=LABELS)
    base_dir, _ = tiny("llama")
    process, client = start_server(base_dir, tmp_path / "unused", free_port(),
                                   extra_args=["--adapter-store", prefix])
    try:
        texts = ["great movie", "the lazy dog"]
        for got, want in zip(client.classify(texts, adapter="sentiment"), reference.classify(texts, CLS), strict=True):
            assert got.label == want.label and got.scores == pytest.approx(want.scores, abs=1e-4)
        outside.publish(sources[GEN], "replies")  # after the server started: seen on the first miss
        prompt = "hello world"
        ids = reference.tokenizer(prompt)["input_ids"]
        want_tokens = reference.generate([ids], [GEN], SamplingParams(max_new_tokens=8))[0].token_ids
        assert client.generate(prompt, adapter="replies", max_tokens=8).token_ids == want_tokens

        info = client.adapters.upload(sources[GEN], name="uploaded")
        manifest, folder = outside.resolve("uploaded")
        assert (info.reference, manifest.version) == ("uploaded@1", 1)
        assert file_sha256(folder / "adapter_model.safetensors") == file_sha256(
            Path(sources[GEN]) / "adapter_model.safetensors")
        assert not (tmp_path / "unused").exists(), "the folder store was opened beside the S3 store"

        outside.delete("sentiment")
        deadline = time.time() + 60  # the server's list refreshes every 5 s
        while time.time() < deadline and "sentiment@1" in [i.reference for i in client.adapters.list()]:
            time.sleep(0.2)
        with pytest.raises(NotFound, match="sentiment"):
            client.classify(texts, adapter="sentiment")
    finally:
        client.close()
        process.kill()
        process.wait()


def test_open_store_picks_the_backend_and_a_folder_store_never_imports_boto3(s3, tmp_path):
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from loraplex_adapters.store_protocol import open_store
        from loraplex_adapters.store import AdapterStore
        assert type(open_store({str(tmp_path / "folder")!r})) is AdapterStore
        assert "boto3" not in sys.modules and "botocore" not in sys.modules, "a folder store imported boto3"
        store = open_store("s3://{BUCKET}/picked", max_rank=4)
        assert type(store).__name__ == "S3AdapterStore" and store.max_rank == 4 and store.staging.is_dir()
    """)], capture_output=True, text=True, timeout=120, env=os.environ)
    assert probe.returncode == 0, probe.stderr
