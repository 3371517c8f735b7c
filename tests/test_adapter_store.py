"""The on-disk store: versions, atomic publish, index rebuilt from disk, and every refusal."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex_adapters.fingerprint import file_sha256
from loraplex_adapters.peft_folder import AdapterFormatError
from loraplex_adapters.store import AdapterNotInStore, AdapterStore

GEN, CLS = "gen_qv_r4", "cls3_r2"


@pytest.fixture
def sources(tiny):
    _, adapters = tiny("llama")
    return {name: folder for name, (folder, _) in adapters.items()}


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "store", base_fingerprint="sha256:base", max_rank=16, max_bytes=1 << 20)


def snapshot(store: AdapterStore):
    files = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    return [(m.name, m.version) for m in store.list()], files


def test_publish_versions_resolve_and_manifest(store, sources):
    first = store.publish(sources[GEN], "replies")
    second = store.publish(sources[GEN], "replies", metrics={"perplexity": 12.5})
    assert (first.version, second.version) == (1, 2)
    manifest, folder = store.resolve("replies")
    assert manifest.version == 2 and folder == store.root / "adapters" / "replies" / "2"
    assert store.resolve("replies", 1)[0].version == 1
    extra = manifest.extra
    assert extra["task"] == "generation" and extra["rank"] == 4 and extra["target_modules"] == ["q_proj", "v_proj"]
    assert extra["base_fingerprint"] == "sha256:base" and extra["metrics"] == {"perplexity": 12.5}
    assert extra["sha256"]["adapter_model.safetensors"] == file_sha256(folder / "adapter_model.safetensors")
    assert extra["size"] == sum(p.stat().st_size for p in folder.iterdir() if p.name != "loraplex.json")
    labelled = store.publish(sources[CLS], "sentiment", labels=["neg", "neu", "pos"])
    assert labelled.extra["task"] == "classification" and labelled.labels == ["neg", "neu", "pos"]
    with pytest.raises(AdapterNotInStore):
        store.resolve("replies", 3)


def test_index_is_rebuilt_from_disk(store, sources):
    store.publish(sources[GEN], "replies")
    store.publish(sources[GEN], "replies")
    store.publish(sources[CLS], "sentiment", labels=["a", "b", "c"])
    reopened = AdapterStore(store.root)
    assert [(m.name, m.version) for m in reopened.list()] == [("replies", 1), ("replies", 2), ("sentiment", 1)]
    assert reopened.resolve("sentiment")[0].labels == ["a", "b", "c"]


def test_delete_a_version_then_all(store, sources):
    for _ in range(3):
        store.publish(sources[GEN], "replies")
    assert store.delete("replies", 2) == [2]
    assert [m.version for m in store.list()] == [1, 3]
    assert store.delete("replies") == [1, 3]
    assert store.list() == [] and not (store.root / "adapters" / "replies").exists()
    with pytest.raises(AdapterNotInStore):
        store.delete("replies")
    # A number is never handed out twice: another process may still cache replies@3's weights.
    assert store.publish(sources[GEN], "replies").version == 4
    assert AdapterStore(store.root).publish(sources[GEN], "replies").version == 5


def edit(folder, config=None, weights=None):
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        weights(tensors)
        save_file(tensors, path)


def nan_weights(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))


def big_rank(tensors):
    for key in list(tensors):
        if "lora_A" in key:
            tensors[key] = torch.zeros(32, tensors[key].shape[1])
        elif "lora_B" in key:
            tensors[key] = torch.zeros(tensors[key].shape[0], 32)


@pytest.mark.parametrize(("name", "mutate", "kwargs", "message"), [
    ("x", lambda f: (f / "adapter_model.bin").write_bytes(b"pickle"), {}, "pickle"),
    ("x", lambda f: (f / "adapter_config.json").write_text("{oops"), {}, "not valid JSON"),
    ("x", lambda f: edit(f, weights=nan_weights), {}, "NaN"),
    ("x", lambda f: edit(f, weights=big_rank), {}, "above the server's max rank 16"),
    ("x", lambda f: edit(f, config={"use_dora": True}), {}, "DoRA"),
    ("x", lambda f: (f / "notes.txt").write_text("hi"), {}, "unexpected entry"),
    ("x", lambda f: (f / "README.md").write_bytes(b"x" * (2 << 20)), {}, "byte limit"),
    ("x", lambda f: None, {"base_fingerprint": "sha256:other"}, "trained on base sha256:other"),
    ("../evil", lambda f: None, {}, "invalid adapter name"),
    ("a/b", lambda f: None, {}, "invalid adapter name"),
    ("bad\x00name", lambda f: None, {}, "invalid adapter name"),
    ("..", lambda f: None, {}, "invalid adapter name"),
])
def test_invalid_uploads_are_refused_and_the_store_is_unchanged(store, sources, tmp_path, name, mutate, kwargs,
                                                                 message):
    store.publish(sources[GEN], "kept")
    before = snapshot(store)
    folder = tmp_path / "candidate"
    shutil.copytree(sources[GEN], folder)
    mutate(folder)
    with pytest.raises(AdapterFormatError, match=message):
        store.publish(folder, name, **kwargs)
    assert snapshot(store) == before
    assert list(store.staging.iterdir()) == []


def test_classification_adapter_needs_matching_labels(store, sources):
    with pytest.raises(AdapterFormatError, match="needs label names"):
        store.publish(sources[CLS], "sentiment")
    with pytest.raises(AdapterFormatError, match="2 label names for a head with 3"):
        store.publish(sources[CLS], "sentiment", labels=["a", "b"])
    assert store.list() == []


def test_base_mismatch_accepted_when_allowed(tmp_path, sources):
    store = AdapterStore(tmp_path / "s", base_fingerprint="sha256:base", allow_base_mismatch=True)
    assert store.publish(sources[GEN], "x", base_fingerprint="sha256:other").version == 1


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_archives(store, sources, tmp_path):
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(sources[GEN], arcname="my-adapter")
    assert store.publish(good, "from-tar").version == 1
    link = tarfile.TarInfo("adapter/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    config = (sources[GEN] / "adapter_config.json").read_bytes()
    cases = {
        "link": ([file_member("adapter/adapter_config.json", config), (link, None)], "is a link"),
        "escape": ([file_member("../adapter_config.json", config)], "escapes"),
        "absolute": ([file_member("/tmp/adapter_config.json", config)], "escapes"),
        "huge": ([file_member("adapter/adapter_config.json", config),
                  file_member("adapter/README.md", b"x" * (2 << 20))], "byte limit"),
    }
    before = snapshot(store)
    for label, (members, message) in cases.items():
        with pytest.raises(AdapterFormatError, match=message):
            store.publish(make_tar(tmp_path / f"{label}.tar.gz", members), label)
    assert snapshot(store) == before and list(store.staging.iterdir()) == []


def test_kill_9_during_publish_leaves_nothing_visible(store, sources, tmp_path):
    store.publish(sources[GEN], "kept")
    ready = tmp_path / "ready"
    # The publisher stops just before its commit rename, as if the machine died there.
    script = f"""
import os, time, pathlib
from loraplex_adapters import store as s
def stall(src, dst):
    pathlib.Path({str(ready)!r}).write_text("x")
    time.sleep(600)
s.os.rename = stall
s.AdapterStore({str(store.root)!r}).publish({str(sources[GEN])!r}, "half")
"""
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the publisher never reached its commit point"
    staging = store.root / "staging"
    (dead,) = [p for p in staging.iterdir() if p.is_dir() and p != store.staging]
    assert any(dead.iterdir()), "the half upload should be sitting in the publisher's staging folder"
    process.send_signal(signal.SIGKILL)
    process.wait()
    reopened = AdapterStore(store.root)  # the dead publisher held the store lock: it must be free again
    assert [(m.name, m.version) for m in reopened.list()] == [("kept", 1)]
    assert not dead.exists() and not Path(f"{dead}.lock").exists()
    assert sorted(p for p in staging.iterdir() if p.is_dir()) == sorted([store.staging, reopened.staging])
    assert reopened.publish(sources[GEN], "half").version == 1


def test_two_store_objects_on_one_folder_see_each_other(store, sources):
    other = AdapterStore(store.root)
    assert store.publish(sources[GEN], "replies").version == 1
    assert other.publish(sources[GEN], "replies").version == 2  # claimed from the disk, not other's index
    assert store.resolve("replies")[0].version == 2 and store.has("replies")
    assert other.delete("replies", 1) == [1]
    with pytest.raises(AdapterNotInStore, match="no version 1"):
        store.resolve("replies", 1)
    assert store.publish(sources[GEN], "replies").version == 3
    assert other.delete("replies") == [2, 3]  # what is on disk now, including what other never saw
    assert not store.has("replies") and store.list() == []
    for hostile in ("", "../adapters", "replies/../..", "a" * 10_000):
        assert not store.has(hostile)


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda f: (f / "loraplex.json").unlink(), "manifest is missing"),
    (lambda f: (f / "loraplex.json").write_text("{oops"), "not valid JSON"),
    (lambda f: (f / "notes.txt").write_text("hi"), "differ from the manifest"),
    (lambda f: (f / "adapter_config.json").write_text("{}"), "sha256"),
    (lambda f: f.rename(f.parent / "9"), "names replies@2"),
])
def test_an_unreadable_version_is_quarantined_with_its_reason(store, sources, caplog, damage, reason):
    store.publish(sources[GEN], "replies")
    store.publish(sources[GEN], "replies")
    damage(store.root / "adapters" / "replies" / "2")
    with caplog.at_level("WARNING", logger="loraplex_adapters.store"):
        reopened = AdapterStore(store.root)
        AdapterStore(store.root)
    (record,) = caplog.records
    assert "replies@" in record.getMessage() and reason in record.getMessage()
    assert [m.version for m in reopened.list()] == [1]
    assert [p.name.rsplit("-", 1)[0] for p in (store.root / "quarantine").iterdir()] in (["replies-2"], ["replies-9"])
    assert reopened.publish(sources[GEN], "replies").version == (10 if reason.startswith("names") else 3)
