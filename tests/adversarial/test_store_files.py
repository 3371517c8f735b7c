"""Hostile files in the store's folders (issue 19, classes 1 and 2): every file the store reads (manifest,
config, weights, claims, lock) on lookup, load and list, replaced by a link out of the store, a link to a
FIFO, a FIFO, or rewritten after publish.

Each is refused or quarantined without ever blocking (a FIFO nobody writes would hang a blocking open
forever; here every store call must return), and never blocks the other names. Weights rewritten after
publish never load: the bytes are hashed as they are read into memory.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex_adapters.store import AdapterNotInStore, AdapterQuarantined, AdapterStore

GEN = "gen_qv_r4"
CONFIG, WEIGHTS, MANIFEST = "adapter_config.json", "adapter_model.safetensors", "loraplex.json"
BOUND_SECONDS = 60  # generous: a blocked call never returns at all


@pytest.fixture
def source(tiny):
    return tiny("llama")[1][GEN][0]


@pytest.fixture
def outside(tmp_path):
    """A folder beside the store (never under it), and the FIFOs made in it, released after the test."""
    folder = tmp_path / "outside"
    folder.mkdir()
    yield folder
    for fifo in folder.rglob("*"):
        if fifo.is_fifo():  # a call that did block on it gets its writer and returns
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass


def finishes(call, *args):
    """call(*args) in a thread; fails the test if it does not return within BOUND_SECONDS (it blocked)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND_SECONDS)
    assert not thread.is_alive(), f"{getattr(call, '__name__', call)} blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def swap(target: Path, make) -> None:
    """Replace the file or folder at `target` with what make(target) puts there."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()
    make(target)


def link_to_fifo(outside: Path):
    return lambda target: target.symlink_to(fifo(outside / f"fifo-{target.name}"))


def link_to_copy(outside: Path):
    """A link to a byte-identical copy outside the store: its sha256 passes, the link must not."""
    def make(target: Path) -> None:
        copy = outside / f"copy-{target.name}"
        target.symlink_to(copy, target_is_directory=copy.is_dir())
    return make


HOSTILE_FILES = {
    "link to a FIFO": link_to_fifo,
    "FIFO": lambda outside: fifo,
    "link to an identical copy outside": link_to_copy,
}


def published(tmp_path: Path, source: Path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store")
    for name in ("replies", "replies", "other"):
        store.publish(source, name)
    return store


def copy_out(store: AdapterStore, outside: Path, entry: str) -> None:
    """Copy replies@2's `entry` (a file, or the folder itself when "") beside the store, byte for byte."""
    version = store.root / "adapters" / "replies" / "2"
    source = version / entry if entry else version
    target = outside / f"copy-{source.name}"
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)


def assert_refused_and_others_serve(store: AdapterStore, source: Path) -> None:
    """replies@2 is gone (quarantined), replies@1 and other@1 load, and nothing blocked."""
    reopened = finishes(AdapterStore, store.root)  # the index rebuild reads every manifest and file
    for each in (store, reopened):
        assert [(m.name, m.version) for m in finishes(each.list)] == [("other", 1), ("replies", 1)]
        with pytest.raises(AdapterNotInStore):
            finishes(each.load, "replies", 2)
        assert finishes(each.lookup, "replies").version == 1
        manifest, adapter = finishes(each.load, "other")
        assert manifest.version == 1 and adapter.modules
    assert [p.name.rsplit("-", 1)[0] for p in (store.root / "quarantine").iterdir()] == ["replies-2"]
    assert finishes(store.publish, source, "replies").version == 3, "the quarantined number is never reused"


@pytest.mark.parametrize("kind", HOSTILE_FILES)
@pytest.mark.parametrize("entry", [MANIFEST, CONFIG, WEIGHTS])
def test_a_file_that_is_not_a_regular_file_in_the_store_is_quarantined_at_scan(tmp_path, source, outside, entry,
                                                                                kind):
    store = published(tmp_path, source)
    copy_out(store, outside, entry)
    swap(store.root / "adapters" / "replies" / "2" / entry, HOSTILE_FILES[kind](outside))
    store = finishes(AdapterStore, tmp_path / "store")  # a process that never saw replies@2 before
    assert_refused_and_others_serve(store, source)


@pytest.mark.parametrize("kind", HOSTILE_FILES)
@pytest.mark.parametrize("entry", [CONFIG, WEIGHTS])
def test_a_file_swapped_after_admission_is_quarantined_at_load(tmp_path, source, outside, entry, kind):
    """The version was listed (its files checked) before the swap: the load reads them again."""
    store = published(tmp_path, source)
    assert store.lookup("replies", 2).version == 2
    copy_out(store, outside, entry)
    swap(store.root / "adapters" / "replies" / "2" / entry, HOSTILE_FILES[kind](outside))
    with pytest.raises(AdapterQuarantined, match=f"replies@2 is damaged.*{entry}.*publish it again"):
        finishes(store.load, "replies", 2)
    assert_refused_and_others_serve(store, source)


@pytest.mark.parametrize("when", ["before the scan", "after admission"])
def test_a_version_folder_that_links_out_of_the_store_is_refused(tmp_path, source, outside, when):
    store = published(tmp_path, source)
    if when == "after admission":
        assert store.lookup("replies", 2).version == 2
    copy_out(store, outside, "")
    swap(store.root / "adapters" / "replies" / "2", link_to_copy(outside))
    if when == "before the scan":
        store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterNotInStore):
        finishes(store.load, "replies", 2)
    assert (outside / "copy-2" / WEIGHTS).is_file(), "the quarantine moves the link, never what it points at"
    assert_refused_and_others_serve(store, source)


def test_a_name_folder_that_links_out_of_the_store_is_ignored(tmp_path, source, outside, caplog):
    store = published(tmp_path, source)
    shutil.copytree(store.root / "adapters" / "other", outside / "elsewhere")
    (store.root / "adapters" / "linked").symlink_to(outside / "elsewhere", target_is_directory=True)
    with caplog.at_level("WARNING", logger="loraplex_adapters.store"):
        reopened = finishes(AdapterStore, store.root)
        assert "linked" not in {m.name for m in finishes(reopened.list)}
        with pytest.raises(AdapterNotInStore):
            finishes(reopened.load, "linked")
    assert any("adapters/linked" in r.getMessage() and "not a link" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="linked is a symbolic link, not a folder"):
        finishes(reopened.publish, source, "linked")  # would land outside the store
    assert sorted(p.name for p in (outside / "elsewhere").iterdir()) == ["1"]


@pytest.mark.parametrize("entry", ["store.lock", "claims/replies"])
def test_a_fifo_in_place_of_the_lock_or_a_claim_refuses_publish_without_blocking(tmp_path, source, outside, entry):
    store = published(tmp_path, source)
    swap(store.root / entry, lambda target: target.symlink_to(fifo(outside / "fifo")))
    with pytest.raises(ValueError, match="not a regular file|symbolic link"):
        finishes(store.publish, source, "replies")
    assert finishes(store.load, "other")[0].version == 1  # reading needs neither


def rewrite_weights(folder: Path, change) -> None:
    """Rewrite a version's weights as a valid safetensors file with other values (its manifest kept)."""
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


REWRITES = {
    "one value changed, same size": lambda t: t[sorted(t)[0]].view(-1).__setitem__(0, 0.125),
    "every value scaled": lambda t: [v.mul_(2) for v in t.values()],
    "a tensor dropped": lambda t: t.pop(sorted(t)[-1]),
}


@pytest.mark.parametrize("rewrite", REWRITES)
def test_weights_rewritten_after_publish_never_load(tmp_path, source, rewrite, caplog):
    store = published(tmp_path, source)
    manifest, adapter = store.load("replies", 2)  # served once, as published
    expected = load_file(source / WEIGHTS)
    module = sorted(adapter.modules)[0]
    key = next(k for k in expected if f"{module}.lora_A" in k)
    torch.testing.assert_close(adapter.modules[module].A, expected[key], rtol=0, atol=0)
    rewrite_weights(store.root / "adapters" / "replies" / "2", REWRITES[rewrite])
    with caplog.at_level("WARNING", logger="loraplex_adapters.store"):
        with pytest.raises(AdapterQuarantined, match="replies@2 is damaged in the store"):
            store.load("replies", 2)
    (record,) = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert "replies@2" in record.getMessage()
    assert_refused_and_others_serve(store, source)


def test_a_config_rewritten_after_publish_never_loads(tmp_path, source):
    store = published(tmp_path, source)
    config = store.root / "adapters" / "replies" / "2" / CONFIG
    config.write_text(config.read_text().replace('"r": 4', '"r": 4 '))  # the same config, other bytes
    with pytest.raises(AdapterQuarantined, match=f"{CONFIG} fails its sha256 check"):
        store.load("replies", 2)
    assert_refused_and_others_serve(store, source)
