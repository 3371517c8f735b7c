"""Start a real `loraplex serve` process on 127.0.0.1 and wait until it reports SERVING."""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from loraplex import Client, LoraplexError
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from tiny_models import TEST_DEVICE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_dir, adapter_dir, port, metrics_port=0, max_pending=64, extra_args=(), client_kwargs=None,
                 target=None, in_process=True):
    """A real server on 127.0.0.1:port and a client of it: inside this process (fast; inprocess_server.py), or
    as a `loraplex serve` process for tests that watch the process itself (exit code, log, signals)."""
    argv = ["--base", str(base_dir), "--adapter-dir", str(adapter_dir), "--port", str(port), "--metrics-port",
            str(metrics_port), "--dtype", "float32", "--quantize", "none", "--device", TEST_DEVICE, "--max-pending",
            str(max_pending), *extra_args]
    if in_process:
        from inprocess_server import InProcessServer

        return wait_until_serving(InProcessServer(argv), port, client_kwargs, target)
    command = [sys.executable, "-m", "loraplex_server.app.serve", *argv]
    return start_server_command(command, port, env=dict(os.environ),
                                client_kwargs=client_kwargs, target=target)


def start_server_command(command, port, env, client_kwargs=None, target=None):
    """Run a server command line and wait up to 120 s for SERVING; returns (process, client)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _keep_reading(process)
    return wait_until_serving(process, port, client_kwargs, target)


def wait_until_serving(process, port, client_kwargs=None, target=None):
    client = Client(target or f"127.0.0.1:{port}", **{"timeout": 5, "retries": 0, **(client_kwargs or {})})
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            process.output_reader.join(timeout=30)
            raise RuntimeError(f"server exited: {''.join(process.output)}")
        try:
            if client.health() == "SERVING":
                return process, client
        except LoraplexError:
            pass
        time.sleep(0.2)
    process.kill()
    process.output_reader.join(timeout=30)
    raise RuntimeError(f"server did not become healthy in 120 s: {''.join(list(process.output)[-40:])}")


def _keep_reading(process: subprocess.Popen) -> None:
    """Read the server's output as it comes, into process.output (its last 10,000 lines): unread, a
    full pipe (64 KiB) would block a server that logs a lot, and every later request would stall."""
    process.output = collections.deque(maxlen=10_000)

    def read() -> None:
        for line in process.stdout:
            process.output.append(line)

    process.output_reader = threading.Thread(target=read, name=f"server-{process.pid}-output", daemon=True)
    process.output_reader.start()


@contextlib.contextmanager
def serving_with_http(base_dir, adapter_dir, extra_args=(), client_kwargs=None):
    """A server with its OpenAI HTTP port: {"stub", "url", "http_port", "port", "target", "client", "process",
    "base", "api_key"}; stopped on exit."""
    port, http_port = free_port(), free_port()
    process, client = start_server(base_dir, adapter_dir, port, client_kwargs=client_kwargs,
                                   extra_args=["--http-port", str(http_port), *extra_args])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield {"stub": pb_grpc.InferenceServiceStub(channel), "url": f"http://127.0.0.1:{http_port}",
               "http_port": http_port, "port": port, "target": f"127.0.0.1:{port}", "client": client,
               "process": process, "base": Path(base_dir).name,
               "api_key": (client_kwargs or {}).get("token") or "none"}
    finally:
        channel.close()
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
