"""The SDK against real servers: health truthiness, AsyncClient mirroring Client (adapters included), chat,
and list paging."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from chat_base import chat_base, rendered
from server_process import free_port, start_server

from loraplex import AsyncClient, Client, HealthStatus, InvalidArgument, NotFound, Unavailable
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.v1 import inference_pb2 as pb

GEN, CLS = "gen_qv_r4", "cls3_r2"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """(client, target) of a server on the tiny Llama base with a chat template and an empty store."""
    root = tmp_path_factory.mktemp("sdk")
    base = chat_base(tiny("llama")[0], root / "base")
    port = free_port()
    process, client = start_server(base, root / "store", port, client_kwargs={"timeout": 60})
    yield client, f"127.0.0.1:{port}"
    client.close()
    process.kill()
    process.wait()


def sources(tiny) -> dict:
    return {name: folder for name, (folder, _) in tiny("llama")[1].items()}


def _wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# Long enough for one health answer on a loaded 2-core machine (0.5 s once timed out on the RPC itself, so the
# last answer was DEADLINE_EXCEEDED), and far inside the 60 s drain, so the wait still ends on NOT_SERVING.
NOT_SERVING_WAIT = 2.0


async def _async_health(target: str) -> tuple:
    async with AsyncClient(target, timeout=10, retries=0) as client:
        status, serving = await client.health(), await client.is_serving()
        with pytest.raises(TimeoutError) as waited:
            await client.wait_until_serving(timeout=NOT_SERVING_WAIT)
    return status, serving, str(waited.value)


def test_health_is_true_only_while_serving(tiny, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    # Health says NOT_SERVING for the whole drain delay after SIGTERM: a window that does not race.
    process, client = start_server(tiny("llama")[0], tmp_path, port, extra_args=["--drain-delay", "60"])
    try:
        assert client.health() and client.health() == "SERVING" and client.health() is HealthStatus.SERVING
        assert client.is_serving()
        client.wait_until_serving(timeout=30)
        process.send_signal(signal.SIGTERM)
        _wait_for(lambda: client.health() == "NOT_SERVING")
        status = client.health()
        assert not status and status is HealthStatus.NOT_SERVING and str(status) == "NOT_SERVING"
        assert client.is_serving() is False
        with pytest.raises(TimeoutError, match="NOT_SERVING"):
            client.wait_until_serving(timeout=NOT_SERVING_WAIT)
        status, serving, waited = asyncio.run(_async_health(target))
        assert status is HealthStatus.NOT_SERVING and not status and serving is False and "NOT_SERVING" in waited
    finally:
        process.kill()
        process.wait()
    with pytest.raises(Unavailable):
        client.health()
    assert client.is_serving() is False
    with pytest.raises(TimeoutError, match="UNAVAILABLE"):
        client.wait_until_serving(timeout=0.5)

    async def stopped() -> tuple:
        async with AsyncClient(target, timeout=5, retries=0) as aclient:
            with pytest.raises(Unavailable):
                await aclient.health()
            with pytest.raises(TimeoutError, match="UNAVAILABLE"):
                await aclient.wait_until_serving(timeout=0.5)
            return await aclient.is_serving()

    assert asyncio.run(stopped()) is False
    client.close()


def test_async_adapters_round_trip_matches_the_client(server, tiny):
    client, target = server
    progress = []

    async def run() -> tuple:
        async with AsyncClient(target, timeout=60) as aclient:
            await aclient.wait_until_serving(timeout=30)
            uploaded = await aclient.adapters.upload(sources(tiny)[CLS], name="async-cls", labels=["a", "b", "c"],
                                                     metrics={"accuracy": 0.5},
                                                     progress=lambda done, total: progress.append((done, total)))
            listed = await aclient.adapters.list()
            got = await aclient.adapters.get("async-cls")
            loaded = await aclient.adapters.load("async-cls@1", pin=True)
            classified = await aclient.classify(["hello world"], adapter="async-cls")
            unloaded = await aclient.adapters.unload("async-cls")
            deleted = await aclient.adapters.delete("async-cls")
            with pytest.raises(NotFound):
                await aclient.adapters.get("async-cls")
            return uploaded, listed, got, loaded, classified, unloaded, deleted

    uploaded, listed, got, loaded, classified, unloaded, deleted = asyncio.run(run())
    assert uploaded.reference == "async-cls@1" and uploaded.labels == ["a", "b", "c"]
    assert progress[-1][0] == progress[-1][1] > 0
    assert "async-cls@1" in [info.reference for info in listed]
    assert got.manifest["metrics"] == {"accuracy": 0.5}
    assert loaded.residency == "device" and loaded.pinned
    assert classified[0].label in ("a", "b", "c")
    assert unloaded.residency != "device" and deleted == [1]
    assert "async-cls@1" not in [info.reference for info in client.adapters.list()]


def test_chat_and_chat_stream_on_both_clients(server, tiny):
    client, target = server
    if GEN not in [info.name for info in client.adapters.list()]:
        client.adapters.upload(sources(tiny)[GEN], name=GEN)
    reply = client.chat(CHAT, adapter=GEN, max_tokens=8)
    assert reply.token_ids == client.generate(rendered(CHAT), adapter=GEN, max_tokens=8).token_ids
    as_tuples = [(m["role"], m["content"]) for m in CHAT]
    as_protos = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT]
    assert client.chat(as_tuples, adapter=GEN, max_tokens=8) == reply == client.chat(as_protos, adapter=GEN,
                                                                                      max_tokens=8)
    chunks = list(client.chat_stream(CHAT, adapter=GEN, max_tokens=8))
    assert [t for c in chunks for t in c.token_ids] == reply.token_ids and chunks[-1].finish_reason

    async def run() -> tuple:
        async with AsyncClient(target, timeout=60) as aclient:
            unary = await aclient.chat(CHAT, adapter=GEN, max_tokens=8)
            streamed = [c async for c in aclient.chat_stream(as_tuples, adapter=GEN, max_tokens=8)]
            with pytest.raises(InvalidArgument, match="role"):
                await aclient.chat([("robot", "hi")], adapter=GEN)
            return unary, streamed

    unary, streamed = asyncio.run(run())
    assert unary == reply and [t for c in streamed for t in c.token_ids] == reply.token_ids


def test_malformed_messages_fail_before_any_call():
    client = Client("127.0.0.1:1", retries=0)  # nothing listens: a call would be UNAVAILABLE
    with pytest.raises(TypeError, match="message 1"):
        client.chat([{"role": "user", "content": "hi"}, {"role": "user"}])
    with pytest.raises(TypeError):
        client.chat_stream("hello")
    with pytest.raises(ValueError, match="at least one"):
        client.chat([])
    with pytest.raises(ValueError, match="page_size"):
        client.adapters.list(page_size=1001)
    client.close()


def test_list_follows_every_page(server, tiny):
    client, target = server
    for _ in range(5):
        client.adapters.upload(sources(tiny)[GEN], name="paged")
    everything = client.adapters.list()
    assert [info.version for info in everything if info.name == "paged"] == [1, 2, 3, 4, 5]
    assert client.adapters.list(page_size=2) == everything
    with grpc.insecure_channel(target) as channel:  # the raw first page: the SDK did follow several
        first = adapters_pb2_grpc.AdapterServiceStub(channel).List(adapters_pb2.ListRequest(page_size=2), timeout=30)
    assert len(first.adapters) == 2 and first.next_page_token

    async def run() -> list:
        async with AsyncClient(target, timeout=60) as aclient:
            return await aclient.adapters.list(page_size=1)

    assert asyncio.run(run()) == everything
