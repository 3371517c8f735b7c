"""Start a real `loraplex serve` process on 127.0.0.1 and wait until it reports SERVING."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from loraplex import Client, LoraplexError
from tiny_models import TEST_DEVICE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_dir, adapter_dir, port, metrics_port=0, max_pending=64, extra_args=(), client_kwargs=None,
                 target=None):
    env = {**os.environ, "LORAPLEX_CPU_KERNEL": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex_server.serve", "--base", str(base_dir), "--adapter-dir", str(adapter_dir),
         "--port", str(port), "--metrics-port", str(metrics_port), "--dtype", "float32", "--quantize", "none",
         "--device", TEST_DEVICE,
         "--max-pending", str(max_pending), *extra_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = Client(target or f"127.0.0.1:{port}", **{"timeout": 5, "retries": 0, **(client_kwargs or {})})
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read()}")
        try:
            if client.health() == "SERVING":
                return process, client
        except LoraplexError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become healthy")
