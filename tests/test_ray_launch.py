"""`loraplex serve --ray --replicas N` from the command line, as a user runs it: a local Ray cluster of its
own, the replicas behind Ray Serve's gRPC proxy on --port, the SDK talking to it, and SIGTERM ending it all.
(After test_ray_app.py, whose in-process cluster is gone by then: this command starts a fresh one.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve", reason="the cluster extra: pip install 'loraplex[cluster]'")

from server_process import _keep_reading, free_port  # noqa: E402

from loraplex import Client  # noqa: E402
from tiny_models import TEST_DEVICE  # noqa: E402


def test_serve_ray_serves_through_the_proxy_and_stops_on_sigterm(tiny, adapter_dir):
    base, _ = tiny("llama")
    port = free_port()
    flags = ["--base", str(base), "--adapter-dir", str(adapter_dir), "--dtype", "float32", "--quantize", "none",
             "--device", TEST_DEVICE, "--metrics-port", "0"]
    process = subprocess.Popen([sys.executable, "-m", "loraplex_server.app.serve", "--ray", "--replicas", "1",
                                "--port", str(port), "--http-port", str(free_port()), *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _keep_reading(process)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(timeout=240)
            through_ray = client.classify(["great movie", "the quick brown fox"], adapter="cls3_r2")
            streamed = list(client.generate_stream("hello", adapter="gen_qv_r4", max_tokens=3))
        assert [r.label for r in through_ray] and streamed[-1].finish_reason == "length"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    output = "".join(process.output)
    assert code == 0, output[-3000:]
    assert "serving 1 replicas through Ray Serve's gRPC proxy" in output
