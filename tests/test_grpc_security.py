"""Bearer tokens, TLS and message size limits on a real server process."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import free_port, start_server

from loraplex import Client, PermissionDenied, ResourceExhausted, Unauthenticated

CLS = "cls3_r2"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def secured(tiny, adapter_dir, tls_files):
    """TLS, two user tokens and an admin token, and a 64 KiB message limit."""
    cert, key = tls_files
    port = free_port()
    process, client = start_server(
        tiny("llama")[0], adapter_dir, port,
        extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--token", "user-1", "--token", "user-2",
                    "--admin-token", "admin-1", "--max-message-bytes", str(64 * 1024)],
        client_kwargs={"ca_cert": str(cert), "token": "user-1"}, target=f"localhost:{port}")
    yield port, cert, client
    client.close()
    process.kill()
    process.wait()


def test_valid_tokens_are_accepted(secured):
    port, cert, client = secured
    assert len(client.classify(["hello"], adapter=CLS)) == 1
    for token in ("user-2", "admin-1"):
        with Client(f"localhost:{port}", token=token, ca_cert=str(cert), retries=0) as other:
            assert other.classify(["hello"], adapter=CLS)[0].label.startswith(CLS)


@pytest.mark.parametrize(("token", "message"), [(None, "missing bearer token"), ("user-3", "invalid bearer token"),
                                                ("user-1x", "invalid bearer token")])
def test_missing_or_wrong_token_is_unauthenticated(secured, token, message):
    port, cert, _ = secured
    with Client(f"localhost:{port}", token=token, ca_cert=str(cert), retries=0) as other:
        with pytest.raises(Unauthenticated, match=message):
            other.classify(["hello"], adapter=CLS)
        with pytest.raises(Unauthenticated):
            list(other.generate_stream("hello", max_tokens=2))
        assert other.health() == "SERVING"  # health checking stays open


def test_plaintext_client_cannot_talk_to_the_tls_port(secured):
    """The same port answers TLS before and after, so the plaintext failure is the refusal, not a dead port."""
    port, cert, _ = secured
    request = health_pb2.HealthCheckRequest()
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(cert.read_bytes())) as tls:
        assert health_pb2_grpc.HealthStub(tls).Check(request, timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health_pb2_grpc.HealthStub(tls).Check(request, timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_oversized_message_is_resource_exhausted(secured):
    client = secured[2]
    with pytest.raises(ResourceExhausted):
        client.classify(["x" * (100 * 1024)], adapter=CLS)
    assert len(client.classify(["still serving"], adapter=CLS)) == 1


def test_adapter_management_needs_an_admin_token(secured, tiny):
    port, cert, user = secured
    folder = tiny("llama")[1][CLS][0]
    with pytest.raises(PermissionDenied, match="admin token"):  # a known caller who may not: not UNAUTHENTICATED
        user.adapters.list()
    with pytest.raises(PermissionDenied, match="admin token"):
        user.adapters.upload(folder, name="by-user", labels=["a", "b", "c"])
    with Client(f"localhost:{port}", token="nobody", ca_cert=str(cert), retries=0) as stranger:
        with pytest.raises(Unauthenticated, match="invalid bearer token"):
            stranger.adapters.list()
    with Client(f"localhost:{port}", token="admin-1", ca_cert=str(cert), retries=0) as admin:
        assert admin.adapters.upload(folder, name="by-admin", labels=["a", "b", "c"]).version == 1
        assert user.classify(["hello"], adapter="by-admin")[0].label in {"a", "b", "c"}
        assert admin.adapters.delete("by-admin") == [1]
        assert "by-user" not in {info.name for info in admin.adapters.list()}
