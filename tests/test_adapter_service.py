"""AdapterService over real gRPC: upload, list, get, delete, load/unload, every refusal, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_process import free_port, start_server

from loraplex import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from loraplex.cli import main as cli_main
from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

GEN, CLS = "gen_all_r8", "cls3_r2"
MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    base_dir, _ = tiny("llama")
    store, port = tmp_path_factory.mktemp("upload-store"), free_port()
    process, client = start_server(base_dir, store, port, extra_args=[
        "--max-rank", "6", "--max-upload-bytes", str(MAX_UPLOAD)])
    yield client, store, f"127.0.0.1:{port}"
    client.close()
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def reference(tiny):
    base_dir, adapters = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=4)
    engine.load_adapter(CLS, adapters[CLS][0], labels=["neg", "neu", "pos"])
    engine.load_adapter("gen_qv_r4", adapters["gen_qv_r4"][0])
    return engine


def sources(tiny) -> dict:
    return {name: folder for name, (folder, _) in tiny("llama")[1].items()}


def names(client) -> list[str]:
    return [info.reference for info in client.adapters.list()]


def test_upload_then_classify_generate_list_get_delete(server, reference, tiny):
    client = server[0]
    src = sources(tiny)
    info = client.adapters.upload(src[CLS], name="sentiment", labels=["neg", "neu", "pos"], metrics={"acc": 0.8})
    assert (info.reference, info.task, info.rank, info.labels) == ("sentiment@1", "classification", 2,
                                                                   ["neg", "neu", "pos"])
    assert info.manifest["metrics"] == {"acc": 0.8} and "adapter_model.safetensors" in info.manifest["sha256"]
    assert info.residency == "disk"
    texts = ["great movie", "the lazy dog"]
    got = client.classify(texts, adapter="sentiment")
    want = reference.classify(texts, CLS)
    for g, w in zip(got, want, strict=True):
        assert g.label == w.label and g.scores == pytest.approx(w.scores, abs=1e-4)
    assert client.adapters.get("sentiment").residency == "device"

    client.adapters.upload(src["gen_qv_r4"], name="replies")
    prompt = "hello world"
    ids = reference.tokenizer(prompt)["input_ids"]
    want_tokens = reference.generate([ids], ["gen_qv_r4"], SamplingParams(max_new_tokens=8))[0].token_ids
    assert client.generate(prompt, adapter="replies", max_tokens=8).token_ids == want_tokens

    assert {"sentiment@1", "replies@1"} <= set(names(client))
    assert client.adapters.delete("replies") == [1]
    with pytest.raises(NotFound):
        client.generate(prompt, adapter="replies")
    with pytest.raises(NotFound):
        client.adapters.get("replies")


def test_versions_resolve_and_old_versions_load_on_demand(server, tiny):
    client = server[0]
    src = sources(tiny)
    client.adapters.upload(src[CLS], name="versions", labels=["a", "b", "c"])
    client.adapters.upload(src["cls5_r6"], name="versions", labels=list("vwxyz"))
    assert client.adapters.get("versions").version == 2
    assert set(client.classify(["x"], adapter="versions")[0].scores) == set("vwxyz")
    assert set(client.classify(["x"], adapter="versions@1")[0].scores) == {"a", "b", "c"}
    with pytest.raises(NotFound, match="no version 3"):
        client.classify(["x"], adapter="versions@3")


def test_load_pin_unload(server, tiny):
    client = server[0]
    client.adapters.upload(sources(tiny)[CLS], name="pinned", labels=["a", "b", "c"])
    info = client.adapters.load("pinned", pin=True)
    assert (info.residency, info.pinned) == ("device", True)
    info = client.adapters.unload("pinned")
    assert (info.residency, info.pinned) == ("host", False)
    assert client.classify(["x"], adapter="pinned")[0].label in {"a", "b", "c"}


def _tar(folder, extra=None) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"adapter/{path.name}")
        if extra:
            extra(tar)
    return data.getvalue()


def _upload_raw(client, messages):
    stub = pb_grpc.AdapterServiceStub(client._channel)
    return stub.Upload(iter(messages), timeout=10)


def _metadata(payload: bytes, name="raw", **fields):
    meta = dict(name=name, size_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    meta.update(fields)
    return pb.UploadRequest(metadata=pb.UploadMetadata(**meta))


def _edit(folder, weights=None, config=None):
    if config is not None:
        (folder / "adapter_config.json").write_text(config)
    if weights is not None:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        weights(tensors)
        save_file(tensors, path)


def _rename_modules(tensors):
    for key in list(tensors):
        tensors[key.replace("q_proj", "x_proj")] = tensors.pop(key)


def _wrong_shape(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], 7)


def _first_lora_a(tensors, value):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = value(tensors[key])


def _link(tar):
    info = tarfile.TarInfo("adapter/evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _escape(tar):
    data = b"x"
    info = tarfile.TarInfo("../escaped.txt")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bomb(tar):
    data = b"\0" * (MAX_UPLOAD * 2)
    info = tarfile.TarInfo("adapter/README.md")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


INVALID = [  # (id, source adapter, folder edit, tar extra, metadata fields, status, message)
    ("pickle", CLS, lambda f: (f / "adapter_model.bin").write_bytes(b"x"), None, {}, "INVALID_ARGUMENT", "pickle"),
    ("bad config", CLS, lambda f: _edit(f, config="{oops"), None, {}, "INVALID_ARGUMENT", "not valid JSON"),
    ("bad metrics", CLS, None, None, {"metrics_json": "[1"}, "INVALID_ARGUMENT", "metrics_json"),
    ("absent module", "gen_qv_r4", lambda f: _edit(f, weights=_rename_modules), None, {}, "INVALID_ARGUMENT",
     "does not exist in the base model"),
    ("shape", "gen_qv_r4", lambda f: _edit(f, weights=_wrong_shape), None, {}, "INVALID_ARGUMENT", "shape mismatch"),
    ("rank", GEN, None, None, {}, "INVALID_ARGUMENT", "rank 8 is above the server's max rank 6"),
    ("nan", "gen_qv_r4", lambda f: _edit(f, weights=lambda t: _first_lora_a(t, lambda a: a * float("nan"))),
     None, {}, "INVALID_ARGUMENT", "NaN"),
    ("int weights", "gen_qv_r4", lambda f: _edit(f, weights=lambda t: _first_lora_a(t, lambda a: a.to(torch.int32))),
     None, {}, "INVALID_ARGUMENT", "float"),
    ("base mismatch", CLS, None, None, {"base_fingerprint": "sha256:other", "labels": ["a", "b", "c"]},
     "FAILED_PRECONDITION", "trained on base sha256:other"),
    ("no labels", CLS, None, None, {"labels": []}, "INVALID_ARGUMENT", "needs label names"),
    ("labels, no head", "gen_qv_r4", None, None, {"labels": ["a"]}, "INVALID_ARGUMENT", "no classification head"),
    ("name ..", CLS, None, None, {"name": ".."}, "INVALID_ARGUMENT", "invalid adapter name"),
    ("name /", CLS, None, None, {"name": "a/b"}, "INVALID_ARGUMENT", "invalid adapter name"),
    ("name control", CLS, None, None, {"name": "bad\nname"}, "INVALID_ARGUMENT", "invalid adapter name"),
    ("link", CLS, None, _link, {}, "INVALID_ARGUMENT", "is a link"),
    ("escape", CLS, None, _escape, {}, "INVALID_ARGUMENT", "escapes the adapter folder"),
    ("unpacks too big", CLS, None, _bomb, {}, "RESOURCE_EXHAUSTED", "byte limit"),
    ("declared too big", CLS, None, None, {"size_bytes": MAX_UPLOAD + 1}, "RESOURCE_EXHAUSTED", "over the server's"),
    ("checksum", CLS, None, None, {"sha256": "0" * 64}, "INVALID_ARGUMENT", "checksum mismatch"),
    ("not a tar", None, None, None, {}, "INVALID_ARGUMENT", "not a .tar"),
]


@pytest.mark.parametrize(("source", "edit", "extra", "fields", "code", "message"), [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_invalid_uploads_get_a_precise_status_and_change_nothing(server, tiny, tmp_path, source, edit, extra, fields,
                                                                 code, message):
    client, store, _ = server
    before = names(client)
    if source is None:
        payload = b"this is not an archive"
    else:
        folder = tmp_path / "adapter"
        shutil.copytree(sources(tiny)[source], folder)
        if edit:
            edit(folder)
        payload = _tar(folder, extra)
    fields = {"labels": ["a", "b", "c"] if source == CLS else [], **fields}
    with pytest.raises(grpc.RpcError) as failure:
        _upload_raw(client, [_metadata(payload, **fields), pb.UploadRequest(chunk=payload)])
    assert failure.value.code().name == code, failure.value.details()
    assert message in failure.value.details()
    assert names(client) == before
    assert [p for p in (store / "staging").rglob("*") if p.is_file() and p.suffix != ".lock"] == []


@pytest.mark.parametrize(("messages", "message"), [
    (lambda p: [pb.UploadRequest(chunk=p)], "first upload message must carry the metadata"),
    (lambda p: [_metadata(p), pb.UploadRequest(chunk=p[:10])], "upload ended after 10 of the declared"),
    (lambda p: [_metadata(p), pb.UploadRequest(chunk=p), pb.UploadRequest(chunk=b"x")], "more than the declared"),
    (lambda p: [_metadata(p), _metadata(p)], "metadata may only come once"),
    (lambda p: [], "empty upload"),
])
def test_malformed_upload_streams_are_refused(server, tiny, messages, message):
    client = server[0]
    before = names(client)
    with pytest.raises(grpc.RpcError) as failure:
        _upload_raw(client, messages(_tar(sources(tiny)[CLS])))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in failure.value.details()
    assert names(client) == before


def test_sdk_errors_are_typed(server, tiny, tmp_path):
    client = server[0]
    with pytest.raises(InvalidArgument, match="invalid adapter name"):
        client.adapters.upload(sources(tiny)[CLS], name="a b", labels=["a", "b", "c"])
    big = shutil.copytree(sources(tiny)[CLS], tmp_path / "big")
    (big / "README.md").write_bytes(torch.randint(0, 256, (MAX_UPLOAD,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ResourceExhausted):
        client.adapters.upload(big, name="big", labels=["a", "b", "c"])
    with pytest.raises(FailedPrecondition):
        client.adapters.upload(sources(tiny)[CLS], name="foreign", labels=["a", "b", "c"], base_fingerprint="sha256:x")
    with pytest.raises(NotFound):
        client.adapters.delete("never-uploaded")


def test_cli_upload_with_progress_list_show_rm(server, tiny, capsys):
    client = server[0]
    target = client._channel._channel.target().decode()
    cli = ["--server", target]
    folder = sources(tiny)[CLS]
    assert cli_main([*cli, "adapters", "upload", str(folder), "--name", "cli-made", "--labels", "x,y,z",
                     "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "uploaded cli-made@1" in out and "100%" in err
    assert cli_main([*cli, "adapters", "list"]) == 0
    assert "cli-made@1" in capsys.readouterr().out
    assert cli_main([*cli, "adapters", "show", "cli-made"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["x", "y", "z"]
    assert cli_main([*cli, "adapters", "load", "cli-made@1", "--pin"]) == 0
    assert "pinned" in capsys.readouterr().out
    assert cli_main([*cli, "adapters", "rm", "cli-made"]) == 0
    assert "deleted cli-made@1" in capsys.readouterr().out
    assert cli_main([*cli, "adapters", "rm", "cli-made"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
