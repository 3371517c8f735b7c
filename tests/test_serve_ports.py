"""Start-up refusals: a second server on a busy port fails at once, before the heavy imports and the model
load, with one line naming the port and the flag (it never shares the port), and so does a step budget
or KV cache that cannot work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from server_process import free_port, start_server

from loraplex_server.app.options import build_parser


@pytest.fixture(scope="module")
def running(tiny, tmp_path_factory):
    base_dir, _ = tiny("llama")
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    process, client = start_server(base_dir, tmp_path_factory.mktemp("store"), port, metrics_port,
                                   extra_args=["--http-port", str(http_port)])
    yield base_dir, port, metrics_port, http_port
    client.close()
    process.kill()
    process.wait()


@pytest.mark.parametrize(("which", "flag"), [("grpc", "--port"), ("metrics", "--metrics-port"),
                                            ("http", "--http-port")])
def test_a_busy_port_is_refused_with_the_flag_to_change(running, tmp_path, which, flag):
    base_dir, port, metrics_port, http_port = running
    ports = {"--port": free_port(), "--metrics-port": free_port(), "--http-port": free_port()}
    busy = {"grpc": port, "metrics": metrics_port, "http": http_port}[which]
    ports[flag] = busy
    second = subprocess.run(
        [sys.executable, "-m", "loraplex_server.app.serve", "--base", str(base_dir), "--adapter-dir", str(tmp_path),
         *(f"{name}={value}" for name, value in ports.items()), "--quantize", "none", "--dtype", "float32"],
        capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert f":{busy}" in second.stderr and flag in second.stderr
    assert second.stderr.strip().count("\n") == 0, second.stderr  # one line: no gRPC C++ log, no traceback
    assert "loading the base model" not in second.stderr


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-batch-tokens", "-1", "must be >= 0"),
    ("--max-batch-tokens", "lots", "not an integer"),
    ("--kv-cache-memory", "100", "holds no block"),
    ("--kv-cache-memory", "-1G", "not a size"),
])
def test_an_unworkable_budget_stops_the_server_with_the_flag_to_change(tiny, tmp_path, flag, value, message):
    base_dir, _ = tiny("llama")
    second = subprocess.run(
        [sys.executable, "-m", "loraplex_server.app.serve", "--base", str(base_dir), "--adapter-dir", str(tmp_path),
         "--port", str(free_port()), "--metrics-port", "0", "--quantize", "none", "--dtype", "float32",
         f"{flag}={value}"],
        capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert message in second.stderr and flag in second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.parametrize("flag", ["--kv-cache-memory", "--adapter-memory", "--host-adapter-memory",
                                  "--max-upload-bytes"])
def test_every_size_flag_refuses_what_is_not_a_size(flag, capsys):
    """In process (argparse exits before anything loads; the subprocess cases above show the whole command)."""
    parser = build_parser()
    for bad in ("big", "", "-1", "-1G", "-0.5k", "inf", "-inf", "nan", "1e30G", "8E"):
        with pytest.raises(SystemExit):
            parser.parse_args([f"{flag}={bad}"])
        assert "not a size" in capsys.readouterr().err, bad
    assert getattr(parser.parse_args([f"{flag}=1.5k"]), flag[2:].replace("-", "_")) == 1536
