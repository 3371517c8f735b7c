"""Hostile uploads through a real server's AdapterService: each class refused with its exact status,
before work is spent on it, with a message free of internals; the store unchanged, staging empty,
and the server still serving after every case."""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from hostile_archives import (
    add_member,
    list_references,
    safetensors_bytes,
    staging_leftovers,
    tar_gz,
    upload_raw,
    zero_tensor_archive,
)
from safetensors.torch import load, save
from server_process import free_port, start_server

GEN, CLS = "gen_qv_r4", "cls3_r2"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
KEY_A, KEY_B, HEAD = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight", "base_model.model.score.weight"
MAX_RANK = 16
INVALID, TOO_LARGE = "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """A server with the default upload limit (512 MB): refusals must come from the checks, not from a
    small cap. One good classifier is registered to show the server still serves after each case."""
    base_dir, adapters = tiny("llama")
    store, port = tmp_path_factory.mktemp("hostile-store"), free_port()
    process, client = start_server(base_dir, store, port, extra_args=["--max-rank", str(MAX_RANK)])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    upload_raw(channel, tar_gz(files_of(adapters[CLS][0])), name="good", labels=["a", "b", "c"])
    yield Server(process, client, channel, store, {name: files_of(folder) for name, (folder, _) in adapters.items()})
    channel.close()
    client.close()
    process.kill()
    process.wait()


@dataclass
class Server:
    process: object
    client: object
    channel: grpc.Channel
    store: Path
    sources: dict[str, dict[str, bytes]]


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# -- building the cases -------------------------------------------------------------------------

def archive(source=GEN, weights=None, config=None, extra=None, drop=(), **fields):
    """A build step: the source adapter's archive with `weights` (bytes), `config` (a dict of changes, or
    bytes) and hand-made `extra` members; metadata `fields` (labels default to the source's)."""
    def build(sources: dict) -> tuple[bytes, dict]:
        files = {k: v for k, v in sources[source].items() if k not in drop}
        if weights is not None:
            files[WEIGHTS] = weights(sources) if callable(weights) else weights
        if isinstance(config, dict):
            files[CONFIG] = json.dumps({**json.loads(files[CONFIG]), **config}).encode()
        elif config is not None:
            files[CONFIG] = config
        return tar_gz(files, extra), {"labels": ["a", "b", "c"] if source == CLS else [], **fields}
    return build


def raw(payload: bytes, **fields):
    return lambda sources: (payload, {"labels": [], **fields})


def lora(a=("F32", [4, 64], None), b=("F32", [64, 4], None)) -> bytes:
    return safetensors_bytes({KEY_A: a, KEY_B: b})


def head(change):
    """The classifier's weights with change(tensors) applied."""
    def weights(sources):
        tensors = load(sources[CLS][WEIGHTS])
        change(tensors)
        return save(tensors)
    return weights


def header_only(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def nested(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def members(*specs):
    def extra(tar):
        for spec in specs:
            add_member(tar, *spec)
    return extra


def bz2_tar(sources) -> tuple[bytes, dict]:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:bz2") as tar:
        for name, content in sources[GEN].items():
            add_member(tar, f"adapter/{name}", content)
    return data.getvalue(), {"labels": []}


def truncated(sources) -> tuple[bytes, dict]:
    payload, fields = archive()(sources)
    return payload[:len(payload) // 2], fields


WEIGHT_CASES = [
    ("float8", archive(weights=lora(a=("F8_E4M3", [4, 64], None))), INVALID, "non-float dtype"),
    ("int32", archive(weights=lora(a=("I32", [4, 64], None))), INVALID, "non-float dtype"),
    ("bool", archive(weights=lora(b=("BOOL", [64, 4], None))), INVALID, "non-float dtype"),
    ("rank-0 tensor", archive(weights=lora(a=("F32", [], None))), INVALID, "must be 2-D"),
    ("1-D lora_A", archive(weights=lora(a=("F32", [64], None))), INVALID, "must be 2-D"),
    ("rank 0", archive(weights=lora(a=("F32", [0, 64], None), b=("F32", [64, 0], None))), INVALID,
     "rank mismatch"),
    ("rank over max", archive(weights=lora(a=("F32", [32, 64], None), b=("F32", [64, 32], None))), INVALID,
     f"rank 32 is above the server's max rank {MAX_RANK}"),
    ("in dim vs base", archive(weights=lora(a=("F32", [4, 4096], None))), INVALID, "shape mismatch"),
    ("out dim vs base", archive(weights=lora(b=("F32", [4096, 4], None))), INVALID, "shape mismatch"),
    ("header length over cap", archive(weights=struct.pack("<Q", 1 << 40) + b"{}"), INVALID,
     "over the 1048576 byte limit"),
    ("header past the file", archive(weights=struct.pack("<Q", 4096) + b"{}"), INVALID, "longer than the file"),
    ("data past the file", archive(weights=lora()[:-100]), INVALID, "declares"),
    ("header not JSON", archive(weights=header_only(b"not json")), INVALID, "not valid JSON"),
    ("header nested deep", archive(weights=header_only(nested(5000))), INVALID, "nested too deeply"),
    ("head NaN", archive(CLS, weights=head(lambda t: t[HEAD].__setitem__((0, 0), float("nan")))), INVALID,
     "NaN or Inf"),
    ("head Inf bias", archive(CLS, weights=head(lambda t: t.__setitem__(
        HEAD.replace("weight", "bias"), torch.tensor([0.0, float("inf"), 0.0])))), INVALID, "NaN or Inf"),
    ("head 5000 labels", archive(CLS, weights=head(lambda t: t.__setitem__(HEAD, torch.zeros(5000, 64))),
                                 labels=["a", "b", "c"]), INVALID, "at most 4096"),
]
CONFIG_CASES = [
    ("lora_alpha string", archive(config={"lora_alpha": "16"}), INVALID, "lora_alpha must be a finite number"),
    ("lora_alpha NaN", archive(config={"lora_alpha": float("nan")}), INVALID, "lora_alpha must be a finite"),
    ("lora_alpha negative", archive(config={"lora_alpha": -8}), INVALID, "lora_alpha must be a finite"),
    ("alpha_pattern list", archive(config={"alpha_pattern": ["q_proj"]}), INVALID, "alpha_pattern must be an object"),
    ("alpha_pattern regex", archive(config={"alpha_pattern": {"(a|aa)+$x": 4}}), INVALID,
     "alpha_pattern key '(a|aa)+$x' is not a plain module name"),
    ("rank_pattern regex", archive(config={"rank_pattern": {".*q_proj": 4}}), INVALID,
     "rank_pattern key '.*q_proj' is not a plain module name"),
    ("alpha_pattern string value", archive(config={"alpha_pattern": {"q_proj": "x"}}), INVALID, "finite number"),
    ("alpha_pattern 4097 keys", archive(config={"alpha_pattern": {f"m{i}": 1 for i in range(4097)}}), INVALID,
     "at most 4096"),
    ("use_rslora string", archive(config={"use_rslora": "yes"}), INVALID, "use_rslora must be true or false"),
    ("config nested deep", archive(config=nested(30000)), INVALID, "nested too deeply"),
    ("config not an object", archive(config=b"[1, 2]"), INVALID, "expected a JSON object"),
    ("config over 64 KiB", archive(config={"padding": "x" * 70000}), TOO_LARGE, "byte limit"),
]
ARCHIVE_CASES = [
    ("truncated gzip", truncated, INVALID, "truncated or corrupt"),
    ("gzip garbage", raw(b"\x1f\x8b\x08\x00" + b"\xff" * 64), INVALID, "truncated or corrupt"),
    ("bz2 tar", bz2_tar, INVALID, "not a .tar or .tar.gz"),
    ("README 8 MB", archive(drop=("README.md",), extra=members(("adapter/README.md", bytes(8 << 20)))), TOO_LARGE,
     "byte limit"),
    ("17 members", archive(extra=members(*[(f"adapter/d{i}", b"", tarfile.DIRTYPE) for i in range(15)])), INVALID,
     "more than 16 members"),
    ("fifo", archive(extra=members(("adapter/fifo", b"", tarfile.FIFOTYPE))), INVALID, "not a regular file"),
    ("char device", archive(extra=members(("adapter/tty", b"", tarfile.CHRTYPE))), INVALID, "not a regular file"),
    ("block device", archive(extra=members(("adapter/sda", b"", tarfile.BLKTYPE))), INVALID, "not a regular file"),
    ("hard link", archive(extra=members(("adapter/README.md", b"", tarfile.LNKTYPE, "adapter/adapter_config.json"))),
     INVALID, "is a link"),
    ("symlink", archive(extra=members(("adapter/README.md", b"", tarfile.SYMTYPE, "/etc/passwd"))), INVALID,
     "is a link"),
    ("dot-dot", archive(extra=members(("adapter/../../README.md", b"x"))), INVALID, "escapes the adapter folder"),
    ("absolute", archive(extra=members(("/abs/README.md", b"x"))), INVALID, "escapes the adapter folder"),
    ("pickle member", archive(extra=members(("adapter/adapter_model.bin", b"x"))), INVALID, "pickle"),
    ("unexpected member", archive(extra=members(("adapter/run.sh", b"x"))), INVALID, "unexpected file"),
    ("duplicate member", archive(extra=members(("adapter/README.md", b"x"), ("adapter/README.md", b"y"))), INVALID,
     "appears twice"),
    ("long-name header", archive(extra=members(("adapter/" + "d" * 20000 + "/README.md", b"x"))), INVALID,
     "extended header"),
    ("sparse member", archive(extra=members(("adapter/README.md", b"", tarfile.GNUTYPE_SPARSE))), INVALID, "sparse"),
    ("two configs", archive(extra=members(("adapter/sub/adapter_config.json", b"{}"))), INVALID, "exactly one"),
    ("no weights", archive(drop=(WEIGHTS,)), INVALID, "no adapter_model.safetensors"),
]
METADATA_CASES = [
    ("metrics over 64 KiB", archive(metrics_json=json.dumps({"x": "y" * 70000})), INVALID, "metrics_json is over"),
    ("metrics nested", archive(metrics_json=nested(40).decode()), INVALID, "nested too deeply"),
    ("metrics recursion", archive(metrics_json=nested(20000).decode()), INVALID, "nested too deeply"),
    ("metrics not an object", archive(metrics_json="[1]"), INVALID, "metrics_json must be a JSON object"),
    ("4097 labels", archive(CLS, labels=[f"l{i}" for i in range(4097)]), INVALID, "at most 4096"),
    ("empty label", archive(CLS, labels=["", "x", "y"]), INVALID, "labels need 1-256"),
    ("257-char label", archive(CLS, labels=["x" * 257, "y", "z"]), INVALID, "labels need 1-256"),
    ("duplicate labels", archive(CLS, labels=["a", "a", "a"]), INVALID, "appears twice"),
    ("control char label", archive(CLS, labels=["a\x07", "b", "c"]), INVALID, "control character"),
    ("newline label", archive(CLS, labels=["a", "b\n", "c"]), INVALID, "control character"),
    ("name trailing newline", archive(name="sentiment\n"), INVALID, "invalid adapter name"),
    ("name tab", archive(name="a\tb"), INVALID, "invalid adapter name"),
    ("name 129 chars", archive(name="n" * 129), INVALID, "invalid adapter name"),
    ("name non-ASCII", archive(name="caf\u00e9"), INVALID, "invalid adapter name"),
    ("base fingerprint spaces", archive(base_fingerprint="sha256 x"), INVALID, "base_fingerprint"),
]
CASES = WEIGHT_CASES + CONFIG_CASES + ARCHIVE_CASES + METADATA_CASES
_INTERNALS = re.compile(r"/tmp|Traceback|\w+Error\(|<class '|\w+Error: ")


# -- the checks ---------------------------------------------------------------------------------

def refuse(server: Server, build) -> grpc.RpcError:
    """Upload the case; it must be refused, change nothing, leave staging empty and the server serving."""
    before = list_references(server.channel)
    payload, fields = build(server.sources)
    with pytest.raises(grpc.RpcError) as failure:
        upload_raw(server.channel, payload, **fields)
    assert list_references(server.channel) == before
    assert staging_leftovers(server.store) == []
    assert server.client.classify(["still serving?"], adapter="good")[0].label in {"a", "b", "c"}
    return failure.value


@pytest.mark.parametrize(("build", "code", "message"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_hostile_upload_is_refused_with_its_status(server, build, code, message):
    error = refuse(server, build)
    assert (error.code().name, message in error.details()) == (code, True), error.details()


def test_no_refusal_message_carries_internals(server):
    """Every refusal of the suite, walked: no server path, traceback or exception class name."""
    store = str(server.store)
    for case_id, build, _, _ in CASES:
        details = refuse(server, build).details()
        assert not _INTERNALS.search(details) and store not in details, (case_id, details)


def peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def test_zero_filled_400mb_tensor_is_refused_from_its_header(server):
    """A 400 MB zero tensor in a tar.gz of under 2 MB: refused from the safetensors header (its in-dim
    does not fit the base), without reading its data into memory."""
    config = server.sources[GEN][CONFIG]
    payload = zero_tensor_archive(config, KEY_A, [4, 25_000_000], {KEY_B: ("F32", [64, 4], None)})
    assert len(payload) < 2 << 20
    peak_before = peak_rss_bytes(server.process.pid)
    error = refuse(server, raw(payload))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape mismatch" in error.details()
    assert peak_rss_bytes(server.process.pid) - peak_before < 100 << 20


def test_plain_pattern_keys_are_accepted(server):
    """gen_mlp_r2 carries rank_pattern and alpha_pattern with plain keys: accepted and served (its
    scaling is checked against PEFT in test_adapter_refusals and the engine-vs-PEFT tests)."""
    payload, _ = archive("gen_mlp_r2")(server.sources)
    info = upload_raw(server.channel, payload, name="patterned").adapter
    assert (info.name, info.version, info.rank) == ("patterned", 1, 6)
    assert len(server.client.generate("hello world", adapter="patterned", max_tokens=4).token_ids) == 4
