"""List pages over a real server: page_size bounds, the 1 MiB page limit, opaque tokens, and
malformed paging input refused with INVALID_ARGUMENT."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from hostile_archives import list_references, tar_gz, upload_raw
from server_process import free_port, start_server

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

NAMES = ("alpha", "beta", "gamma")
VERSIONS = 6
METRICS = json.dumps({"notes": "m" * 60_000})  # ~60 KB per manifest: 18 of them pass 1 MiB
MIB = 1 << 20


@pytest.fixture(scope="module")
def listing(tiny, tmp_path_factory):
    base_dir, adapters = tiny("llama")
    folder = adapters["gen_qv_r4"][0]
    payload = tar_gz({path.name: path.read_bytes() for path in folder.iterdir()})
    process, client = start_server(base_dir, tmp_path_factory.mktemp("paging-store"), port := free_port())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    for name in NAMES:
        for _ in range(VERSIONS):
            upload_raw(channel, payload, name=name, metrics_json=METRICS)
    yield pb_grpc.AdapterServiceStub(channel), channel
    channel.close()
    client.close()
    process.kill()
    process.wait()


EVERY = [f"{name}@{version}" for name in NAMES for version in range(1, VERSIONS + 1)]


def test_default_pages_stay_under_1_mib_and_cover_every_version_once(listing):
    stub, channel = listing
    first = stub.List(pb.ListRequest(), timeout=30)
    assert first.next_page_token and 1 <= len(first.adapters) < len(EVERY)  # cut by bytes, not by the 100
    assert first.ByteSize() <= MIB
    assert list_references(channel) == EVERY


@pytest.mark.parametrize("page_size", [1, 5, 7, 18, 1000])
def test_page_size_pages_in_name_version_order(listing, page_size):
    stub, _ = listing
    pages, token = [], ""
    while True:
        response = stub.List(pb.ListRequest(page_size=page_size, page_token=token), timeout=30)
        assert 1 <= len(response.adapters) <= page_size and response.ByteSize() <= MIB
        pages.append([f"{a.name}@{a.version}" for a in response.adapters])
        token = response.next_page_token
        if not token:
            break
    assert [ref for page in pages for ref in page] == EVERY
    if page_size <= 16:  # 16 manifests of ~60 KB fit in 1 MiB: only the page size cuts these pages
        assert all(len(page) == page_size for page in pages[:-1])


def test_a_token_survives_the_deletion_of_the_entry_it_names(listing, tiny):
    stub, channel = listing
    folder = tiny("llama")[1]["gen_qv_r4"][0]
    payload = tar_gz({p.name: p.read_bytes() for p in folder.iterdir()})
    for _ in range(3):
        upload_raw(channel, payload, name="aaa")  # sorts first
    try:
        first = stub.List(pb.ListRequest(page_size=2), timeout=30)
        assert [f"{a.name}@{a.version}" for a in first.adapters] == ["aaa@1", "aaa@2"]
        stub.Delete(pb.DeleteRequest(adapter="aaa@2"), timeout=30)
        second = stub.List(pb.ListRequest(page_size=2, page_token=first.next_page_token), timeout=30)
        assert [f"{a.name}@{a.version}" for a in second.adapters] == ["aaa@3", EVERY[0]]
    finally:
        stub.Delete(pb.DeleteRequest(adapter="aaa"), timeout=30)


def _token(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode()


@pytest.mark.parametrize(("request_fields", "message"), [
    ({"page_size": 1001}, "page_size must be"),
    ({"page_size": -1}, "page_size must be"),
    ({"page_token": "not base64 !"}, "malformed page_token"),
    ({"page_token": _token(b"alpha")}, "malformed page_token"),  # no version
    ({"page_token": _token(b"\xff\xfe@1")}, "malformed page_token"),
    ({"page_token": _token(b"../etc@1")}, "malformed page_token"),
    ({"page_token": "A" * 4000}, "malformed page_token"),
])
def test_malformed_paging_is_invalid_argument(listing, request_fields, message):
    stub, channel = listing
    with pytest.raises(grpc.RpcError) as failure:
        stub.List(pb.ListRequest(**request_fields), timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in failure.value.details()
    assert list_references(channel, page_size=10) == EVERY  # still serving, nothing changed
