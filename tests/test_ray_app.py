"""loraplex on Ray Serve: a local Ray cluster (2 CPUs, 127.0.0.1), 2 replicas of the tiny Llama base on one
shared folder store, requests through Ray Serve's gRPC proxy with the SDK."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import urllib.request

import grpc
import pytest

pytest.importorskip("ray.serve", reason="the cluster extra: pip install 'loraplex[cluster]'")

from server_process import free_port, start_server  # noqa: E402

from loraplex import Client, LoraplexError  # noqa: E402
from loraplex.v1 import inference_pb2 as pb  # noqa: E402
from loraplex.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from tiny_models import TEST_DEVICE  # noqa: E402

TEXTS = ["great movie, awful plot", "the quick brown fox"]
USER_TOKEN, ADMIN_TOKEN = "ray-user-token", "ray-admin-token"  # Ray's proxy checks none: the replicas do
ROUNDS = 16  # unrouted calls spread over both replicas by Ray's power-of-two choice: all on one is 2**-15


@pytest.fixture(scope="module")
def cluster(tiny, adapter_dir, tmp_path_factory):
    """(gRPC proxy address, the replicas' metrics ports, the shared store folder, the HTTP proxy's URL)."""
    import ray
    from ray import serve

    from loraplex_server.frontends.ray_app import APP_NAME, application, grpc_options

    base, _ = tiny("llama")
    store = tmp_path_factory.mktemp("ray") / "store"
    shutil.copytree(adapter_dir, store)  # this module uploads and deletes: the session's store stays as it is
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, grpc_options=grpc_options(grpc_port))
        argv = ["--base", str(base), "--adapter-dir", str(store), "--dtype", "float32", "--quantize", "none",
                "--device", TEST_DEVICE, "--max-batch", "8", "--metrics-host", "127.0.0.1",
                "--metrics-port", str(metrics_port), "--token", USER_TOKEN, "--admin-token", ADMIN_TOKEN]
        serve.run(application(argv, replicas=2, num_cpus=1), name=APP_NAME)
        yield f"127.0.0.1:{grpc_port}", [metrics_port, metrics_port + 1], store, f"http://127.0.0.1:{http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def scrape(port: int) -> dict[str, float]:
    """One replica's Prometheus samples: 'name{labels}' -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def test_answers_equal_a_single_server(cluster, tiny, adapter_dir):
    address, *_ = cluster
    base, _ = tiny("llama")
    port = free_port()
    process, single = start_server(base, adapter_dir, port)
    try:
        with Client(address, timeout=60, token=ADMIN_TOKEN) as ray_client:
            for adapter in ("cls3_r2", "cls5_r6@1"):
                expected, got = single.classify(TEXTS, adapter), ray_client.classify(TEXTS, adapter)
                assert [r.label for r in got] == [r.label for r in expected]
                assert [r.scores for r in got] == [pytest.approx(r.scores, rel=1e-4, abs=1e-6) for r in expected]
            for adapter in ("gen_qv_r4", "gen_all_r8", None):
                expected = single.generate("hello world", adapter=adapter, max_tokens=8)
                got = ray_client.generate("hello world", adapter=adapter, max_tokens=8)
                assert got.token_ids == expected.token_ids and got.text == expected.text
                streamed = list(ray_client.generate_stream("hello world", adapter=adapter, max_tokens=8))
                assert "".join(c.text for c in streamed) == expected.text
            assert ray_client.health() == "SERVING"  # grpc.health.v1 through the proxy
    finally:
        single.close()
        process.terminate()
        process.wait(timeout=30)


def test_requests_stick_to_the_replica_that_holds_their_adapter(cluster):
    """Per-replica metrics show the affinity: one replica loads the adapter, later requests hit it there."""
    address, ports, *_ = cluster
    before = [scrape(p) for p in ports]
    with Client(address, timeout=60, token=ADMIN_TOKEN) as client:
        first = client.generate("the quick", adapter="gen_mlp_r2", max_tokens=2)
        time.sleep(2)  # the replica reports its new id to the controller; the proxy's router hears it
        for _ in range(8):
            assert client.generate("the quick", adapter="gen_mlp_r2", max_tokens=2).token_ids == first.token_ids
    after = [scrape(p) for p in ports]
    loads = [total(a, "loraplex_routed_adapter_loads_total") - total(b, "loraplex_routed_adapter_loads_total")
             for a, b in zip(after, before, strict=True)]
    device = 'loraplex_routed_requests_total{residency="device"}'
    hits = [total(a, device) - total(b, device) for a, b in zip(after, before, strict=True)]
    assert sorted(loads) == [0, 1]  # one replica loaded it, once
    assert sum(hits) >= 8 and hits[loads.index(1)] >= 8  # and served the rest from its device tier
    for samples in after:
        assert samples["loraplex_device_adapters"] >= 0  # the resident count is exported per replica


def unrouted_classify(address: str, adapter: str) -> list:
    """ROUNDS calls without multiplexed_model_id, so both replicas answer; (label count or status) each."""
    results = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for _ in range(ROUNDS):
            try:
                reply = stub.Classify(pb.ClassifyRequest(adapter=adapter, texts=TEXTS[:1]), timeout=60,
                                     metadata=[("authorization", f"Bearer {USER_TOKEN}")])
                results.append(len(reply.results[0].scores))
            except grpc.RpcError as exc:
                results.append(exc.code())
    return results


def per_replica(ports, prefix: str, before) -> list[float]:
    return [total(scrape(p), prefix) - total(b, prefix) for p, b in zip(ports, before, strict=True)]


def test_upload_publish_and_delete_reach_every_replica(cluster, tiny):
    address, ports, *_ = cluster
    _, adapters = tiny("llama")
    three_labels, five_labels = adapters["cls3_r2"][0], adapters["cls5_r6"][0]
    ok = 'loraplex_requests_total{adapter="fresh",code="OK",method="Classify"}'
    with Client(address, timeout=60, token=ADMIN_TOKEN) as client:
        first = client.adapters.upload(three_labels, "fresh", labels=["a", "b", "c"])
        before = [scrape(p) for p in ports]
        assert unrouted_classify(address, "fresh") == [3] * ROUNDS
        assert all(n > 0 for n in per_replica(ports, ok, before))  # both replicas served version 1
        second = client.adapters.upload(five_labels, "fresh", labels=[f"l{i}" for i in range(5)])
        assert second.version == first.version + 1
        before = [scrape(p) for p in ports]
        assert unrouted_classify(address, "fresh") == [5] * ROUNDS  # no replica kept serving version 1
        assert all(n > 0 for n in per_replica(ports, ok, before))
        assert client.adapters.delete("fresh") == [first.version, second.version]
        before = [scrape(p) for p in ports]
        assert unrouted_classify(address, "fresh") == [grpc.StatusCode.NOT_FOUND] * ROUNDS
        not_found = 'loraplex_requests_total{adapter="unknown",code="NOT_FOUND",method="Classify"}'
        assert all(n > 0 for n in per_replica(ports, not_found, before))  # both answer NOT_FOUND
        with pytest.raises(LoraplexError) as refused:
            client.classify(TEXTS, "fresh")
        assert refused.value.code == grpc.StatusCode.NOT_FOUND and "fresh" in refused.value.details


def test_a_killed_replica_is_restarted(cluster):
    """SIGKILL one replica's process. Ray's controller notices and starts a new one (its own base, engine
    and empty tiers). What a caller sees meanwhile: a request the dead replica held, or one routed to it
    before the router heard of the death, fails: Ray's proxy answers UNAVAILABLE when it knows the replica
    is gone and INTERNAL (with Ray's message) for a request lost inside it; the SDK retries UNAVAILABLE only
    (3 times by default). Later requests go to the survivor, and after the restart to both."""
    from ray import serve

    from loraplex_server.frontends.ray_app import APP_NAME

    address, ports, *_ = cluster
    handle = serve.get_app_handle(APP_NAME)
    victim = handle.replica_pid.remote().result(timeout_s=60)
    os.kill(victim, signal.SIGKILL)
    seen = set()
    with Client(address, timeout=60, retries=0, token=ADMIN_TOKEN) as raw, \
            Client(address, timeout=60, token=ADMIN_TOKEN) as sdk:
        for _ in range(6):
            try:
                raw.classify(TEXTS, "cls3_r2")
                seen.add("OK")
            except LoraplexError as exc:
                seen.add(exc.code.name)
        assert "OK" in seen and seen <= {"OK", "UNAVAILABLE", "INTERNAL"}, seen
        deadline, pids = time.time() + 180, set()
        while time.time() < deadline:  # the controller notices the death, then a new replica loads the base
            pids = {handle.replica_pid.remote().result(timeout_s=60) for _ in range(ROUNDS)}
            if len(pids) == 2 and victim not in pids:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the killed replica was not replaced (answering pids: {pids}, killed: {victim})")
        assert unrouted_classify(address, "cls3_r2") == [3] * ROUNDS
        assert len(sdk.classify(TEXTS, "cls3_r2")) == 2


def test_tokens_are_checked_behind_the_proxy(cluster):
    address, *_ = cluster
    for token in (None, "wrong"):
        with Client(address, timeout=60, retries=0, token=token) as client:
            with pytest.raises(LoraplexError) as refused:
                client.classify(TEXTS, "cls3_r2")
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(address, timeout=60, retries=0, token=USER_TOKEN) as user:
        assert len(user.classify(TEXTS, "cls3_r2")) == 2  # a user token serves inference
        assert list(user.generate_stream("hi", adapter="gen_qv_r4", max_tokens=2))[-1].finish_reason
        with pytest.raises(LoraplexError) as refused:
            user.adapters.list()  # adapter management needs an admin token: a known caller who may not
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    with Client(address, timeout=60, retries=0, token=ADMIN_TOKEN) as admin:
        assert admin.adapters.list()


def test_the_openai_api_works_through_rays_http_proxy(cluster):
    """The OpenAI-compatible API through Ray Serve's HTTP proxy (the deployment's __call__), with the openai
    package: the same answers as our gRPC API through the gRPC proxy, streaming included, and tokens checked."""
    import httpx
    import openai

    address, _, _, url = cluster
    assert httpx.get(url + "/health", timeout=60).json() == {"status": "ok"}
    api = openai.OpenAI(base_url=url + "/v1", api_key=USER_TOKEN, max_retries=0, timeout=60)
    assert {"gen_qv_r4", "cls3_r2@1"} <= {m.id for m in api.models.list().data}
    with Client(address, timeout=60, token=USER_TOKEN) as client:
        expected = client.generate("hello world", adapter="gen_qv_r4", max_tokens=8)
    got = api.completions.create(model="gen_qv_r4", prompt="hello world", max_tokens=8, temperature=0)
    assert got.choices[0].text == expected.text and got.usage.completion_tokens == expected.completion_tokens
    chunks = api.completions.create(model="gen_qv_r4", prompt="hello world", max_tokens=8, temperature=0,
                                    stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    classified = httpx.post(url + "/classify", json={"model": "cls3_r2", "input": TEXTS}, timeout=60,
                            headers={"authorization": f"Bearer {USER_TOKEN}"}).json()
    assert [row["num_classes"] for row in classified["data"]] == [3, 3]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/nowhere", timeout=60).status_code == 404


def test_the_single_node_server_does_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, loraplex_server.app.serve as s; a = s.build_parser().parse_args(['--replicas', '3']); "
            "assert 'ray' not in sys.modules and not a.ray and a.replicas == 3")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from loraplex_server.app.ray_launch import replica_argv

    assert replica_argv(["--ray", "--replicas", "3", "--base", "b", "--replicas=4", "--port", "1"]) == [
        "--base", "b", "--port", "1"]
