"""One store folder shared by several real processes: a running server, publishers, deleters.

Nothing here is mocked: each actor is its own OS process (the test process, `python -c` children, a
real `loraplex serve`), and they meet only through the files of the store.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from server_process import free_port, start_server

from loraplex import NotFound
from loraplex.cli import main as cli_main
from loraplex_adapters.store import AdapterStore
from tiny_models import LLAMA_ADAPTERS, make_adapter

CLS_SPEC = next(spec for spec in LLAMA_ADAPTERS if spec.name == "cls3_r2")
LABELS = "neg,neu,pos"
TEXTS = ["the film was long", "a quiet evening"]


def publish(folder: Path, name: str, root: Path, base: Path, labels: str = "") -> None:
    """Publish through the real `loraplex adapters publish` command (the test process is not the server)."""
    assert cli_main(["adapters", "publish", str(folder), "--name", name, "--store", str(root),
                     "--labels", labels, "--base", str(base)]) == 0


def spawn(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"child exited early: {process.stderr.read()}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err
    return out


def scores(client, adapter: str) -> list[list[float]]:
    return [[c.scores[label] for label in LABELS.split(",")] for c in client.classify(TEXTS, adapter=adapter)]


@pytest.fixture(scope="module")
def llama(tiny, tmp_path_factory):
    """The tiny base, its adapters, and a second 3-label classifier with other weights (same shape)."""
    base, adapters = tiny("llama")
    other = make_adapter(base, tmp_path_factory.mktemp("other") / "cls3_other", CLS_SPEC, seed=99)
    return base, {name: folder for name, (folder, _) in adapters.items()}, other


@pytest.fixture(scope="module")
def served(llama, tmp_path_factory):
    """A real server on a store that already holds one classifier; the test process shares the store."""
    base, sources, _ = llama
    root, port = tmp_path_factory.mktemp("shared-store"), free_port()
    publish(sources["cls3_r2"], "early", root, base, LABELS)
    process, client = start_server(base, root, port, client_kwargs={"timeout": 60})
    yield client, root
    client.close()
    process.kill()
    process.wait()


def test_publish_from_another_process_is_served_without_restart(served, llama):
    client, root = served
    base, sources, _ = llama
    assert len(scores(client, "early")) == 2
    with pytest.raises(NotFound):
        client.classify(TEXTS, adapter="late")
    publish(sources["cls5_r6"], "late", root, base, "a,b,c,d,e")
    publish(sources["gen_qv_r4"], "late-gen", root, base)
    assert set(client.classify(TEXTS, adapter="late")[0].scores) == set("abcde")
    assert client.generate("hello", adapter="late-gen", max_tokens=4).text is not None
    # A new version of a name the server already resolved is its new latest.
    publish(sources["cls5_r6"], "early", root, base, "a,b,c,d,e")
    assert set(client.classify(TEXTS, adapter="early")[0].scores) == set("abcde")
    assert set(client.classify(TEXTS, adapter="early@1")[0].scores) == set(LABELS.split(","))


def test_versions_from_different_folders_serve_their_own_weights(served, llama):
    """v1 and v2 hold different weights of one shape, so serving one for the other shows."""
    client, root = served
    base, sources, other = llama
    publish(sources["cls3_r2"], "ref-one", root, base, LABELS)
    publish(other, "ref-two", root, base, LABELS)
    publish(sources["cls3_r2"], "mixed", root, base, LABELS)
    publish(other, "mixed", root, base, LABELS)
    one, two = scores(client, "ref-one"), scores(client, "ref-two")
    differences = [abs(a - b) for r1, r2 in zip(one, two, strict=True) for a, b in zip(r1, r2, strict=True)]
    assert max(differences) > 1e-3, "the two folders give the same scores: a mix-up could not show"
    for adapter, expected in [("mixed@2", two), ("mixed@1", one), ("mixed", two), ("mixed@1", one)]:
        got = scores(client, adapter)
        assert got == [pytest.approx(row, abs=1e-4) for row in expected], adapter


def test_delete_in_another_process_is_not_found_and_streams_in_flight_finish(served, llama):
    client, root = served
    base, sources, _ = llama
    publish(sources["cls3_r2"], "doomed", root, base, LABELS)
    publish(sources["gen_qv_r4"], "doomed-gen", root, base)
    assert len(scores(client, "doomed@1")) == 2  # now cached in the server's memory
    stream = client.generate_stream("once upon", adapter="doomed-gen", max_tokens=24)
    first = next(stream)
    other_process = AdapterStore(root)
    assert other_process.delete("doomed") == [1]
    assert other_process.delete("doomed-gen") == [1]
    rest = list(stream)
    assert (rest[-1] if rest else first).finish_reason in ("length", "stop")
    for reference in ("doomed", "doomed@1"):
        with pytest.raises(NotFound):
            client.classify(TEXTS, adapter=reference)
    with pytest.raises(NotFound):
        client.generate("x", adapter="doomed-gen", max_tokens=2)
    with pytest.raises(NotFound):
        client.adapters.get("doomed")


def test_two_processes_publishing_one_name_get_distinct_versions(llama, tmp_path):
    base, sources, _ = llama
    root, go = tmp_path / "store", tmp_path / "go"
    AdapterStore(root).close()
    script = """
        import pathlib, sys
        from loraplex_adapters.store import AdapterStore
        store = AdapterStore({root!r})
        pathlib.Path({ready!r}).write_text("ready")
        while not pathlib.Path({go!r}).exists():
            pass  # spin: both start publishing within microseconds
        print(*[store.publish({source!r}, "race").version for _ in range(2)])
    """
    children = []
    for i in range(2):
        ready = tmp_path / f"ready-{i}"
        children.append(spawn(script.format(root=str(root), ready=str(ready), go=str(go),
                                            source=str(sources["gen_qv_r4"]))))
        wait_for(ready, children[-1])
    go.write_text("go")
    versions = sorted(int(v) for child in children for v in finish(child).split())
    assert versions == [1, 2, 3, 4]
    store = AdapterStore(root)
    assert [m.version for m in store.list()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (root / "staging").iterdir()) == sorted(
        [store.staging.name, store.staging.name + ".lock"]), "the publishers left staging behind"


def test_an_upload_in_flight_survives_another_process_opening_the_store(llama, tmp_path):
    base, sources, _ = llama
    root, staged, go = tmp_path / "store", tmp_path / "staged", tmp_path / "go"
    publisher = spawn(f"""
        import pathlib, time
        from loraplex_adapters import store as s
        validate = s.AdapterStore._validate
        def paused(self, folder, manifest):  # the upload sits in staging until the test says go
            pathlib.Path({str(staged)!r}).write_text(str(folder))
            while not pathlib.Path({str(go)!r}).exists():
                time.sleep(0.02)
            validate(self, folder, manifest)
        s.AdapterStore._validate = paused
        print(s.AdapterStore({str(root)!r}).publish({str(sources["gen_qv_r4"])!r}, "inflight").version)
    """)
    wait_for(staged, publisher)
    folder = Path(staged.read_text())
    assert (folder / "adapter_config.json").is_file()
    AdapterStore(root).close()  # another process opens the store (and sweeps staging) meanwhile
    assert (folder / "adapter_config.json").is_file(), "opening the store removed a live upload"
    go.write_text("go")
    assert finish(publisher).split() == ["1"]
    assert [(m.name, m.version) for m in AdapterStore(root).list()] == [("inflight", 1)]


def test_an_unreadable_version_is_quarantined_once_and_never_blocks_the_name(llama, tmp_path):
    base, sources, _ = llama
    root = tmp_path / "store"
    for _ in range(2):
        publish(sources["gen_qv_r4"], "broken", root, base)
    publish(sources["gen_qv_r4"], "tampered", root, base)
    (root / "adapters" / "broken" / "2" / "loraplex.json").write_text('{"name": "broken", "labels": [""')
    weights = root / "adapters" / "tampered" / "1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    opener = [sys.executable, "-c", f"from loraplex_adapters.store import AdapterStore; AdapterStore({str(root)!r})"]
    first = subprocess.run(opener, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "broken@2 quarantined" in first.stderr and "tampered@1 quarantined" in first.stderr
    assert "sha256" in first.stderr and first.stderr.count("quarantined") == 2
    second = subprocess.run(opener, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "quarantined" not in second.stderr, "reported once, not at every open"
    quarantined = sorted(p.name.rsplit("-", 1)[0] for p in (root / "quarantine").iterdir())
    assert quarantined == ["broken-2", "tampered-1"]
    store = AdapterStore(root)
    assert [(m.name, m.version) for m in store.list()] == [("broken", 1)]
    publish(sources["gen_qv_r4"], "broken", root, base)  # numbers continue above the quarantined one
    publish(sources["gen_qv_r4"], "tampered", root, base)
    assert [(m.name, m.version) for m in store.list()] == [("broken", 1), ("broken", 3), ("tampered", 2)]
