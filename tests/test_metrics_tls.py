"""/metrics with TLS: HTTPS with the server's certificate, no plain HTTP, bound on --metrics-host, and a
client that connects and stalls does not block scrapes."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
from server_process import free_port, start_server

METRICS_HOST = "127.0.0.2"  # any 127/8 address is loopback on Linux; the gRPC port stays on 127.0.0.1


@pytest.fixture(scope="module")
def tls_metrics(tiny, adapter_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{METRICS_HOST}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port, metrics_port = free_port(), free_port()
    process, client = start_server(tiny("llama")[0], adapter_dir, port, metrics_port,
                                   extra_args=["--tls-cert", str(cert), "--tls-key", str(key),
                                               "--metrics-host", METRICS_HOST],
                                   client_kwargs={"ca_cert": str(cert)}, target=f"localhost:{port}")
    yield metrics_port, cert
    client.close()
    process.kill()
    process.wait()


def scrape_https(host: str, port: int, cert) -> str:
    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(f"https://{host}:{port}/metrics", context=context, timeout=30) as response:
        return response.read().decode()


def test_metrics_are_served_over_https_only(tls_metrics):
    metrics_port, cert = tls_metrics
    assert "loraplex_requests_total" in scrape_https(METRICS_HOST, metrics_port, cert)
    with pytest.raises((OSError, http.client.HTTPException)):  # the TLS port answers no plain HTTP
        urllib.request.urlopen(f"http://{METRICS_HOST}:{metrics_port}/metrics", timeout=30).read()
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # it is the server's certificate
        urllib.request.urlopen(f"https://{METRICS_HOST}:{metrics_port}/metrics", timeout=30,
                               context=ssl.create_default_context()).read()
    assert "loraplex_requests_total" in scrape_https(METRICS_HOST, metrics_port, cert)  # still serving


def test_metrics_bind_only_on_the_metrics_host(tls_metrics):
    metrics_port, cert = tls_metrics
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=30).close()
    assert "loraplex_batch_rows" in scrape_https(METRICS_HOST, metrics_port, cert)


def test_a_stalled_client_does_not_block_scrapes(tls_metrics):
    """A connection that never starts its TLS handshake (prometheus-client's own TLS server does the
    handshake in accept(), on its only serving thread, so one such client stops every scrape)."""
    metrics_port, cert = tls_metrics
    with socket.create_connection((METRICS_HOST, metrics_port), timeout=30) as stalled:
        assert "loraplex_requests_total" in scrape_https(METRICS_HOST, metrics_port, cert)
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):  # the stalled connection was still open during the scrape
            stalled.recv(1)
