"""The client alone, as a user installs it: build the wheel from the repo, install it into a fresh venv (no
system site-packages, so no torch), and talk to a real server with the SDK and the CLI.

Needs a package index (or pip's cache) for grpcio, protobuf and setuptools; skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from server_process import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "clients/python/loraplex", "server/loraplex_server",
           "adapters/loraplex_adapters"]
NO_INDEX = ("No matching distribution found", "Could not find a version", "NewConnectionError",
            "Network is unreachable", "Temporary failure in name resolution", "Max retries exceeded", "ProxyError")
CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, importlib.util, sys
    import loraplex
    from loraplex import AsyncClient, Client
    assert importlib.util.find_spec("torch") is None, "torch is installed in the client venv"
    assert loraplex.__file__.startswith(sys.prefix), loraplex.__file__
    target = sys.argv[1]
    with Client(target, timeout=60) as client:
        assert client.health() and client.is_serving()
        generated = client.generate("hello", max_tokens=4)
        assert generated.completion_tokens == 4, generated
        assert client.adapters.list() == []
    async def run():
        async with AsyncClient(target, timeout=60) as aclient:
            return await aclient.health(), await aclient.generate("hello", max_tokens=4)
    status, again = asyncio.run(run())
    assert status and again.token_ids == generated.token_ids
    print("ok", generated.token_ids)
""")

pytestmark = pytest.mark.client_wheel


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _pip(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(sign in output for sign in NO_INDEX):
            pytest.skip(f"pip could not reach a package index (or its cache): {output.strip().splitlines()[-1]}")
        raise AssertionError(f"{' '.join(args[:4])} failed:\n{output[-4000:]}")
    return output


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


def _build_wheel(tmp: Path) -> Path:
    """From a clean copy of the sources: setuptools' build/ folder would otherwise keep stale modules."""
    source = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # This venv's setuptools, when new enough for the SPDX license field, saves an isolated build env.
    isolation = [] if _setuptools_major() < 77 else ["--no-build-isolation"]
    output = _pip([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *isolation, "-w",
                   str(tmp / "dist")], tmp)
    # setuptools' own warnings (BuildBackendWarning, SetuptoolsDeprecationWarning): license, package data.
    assert not [line for line in output.splitlines() if "Warning" in line], output
    (wheel,) = (tmp / "dist").glob("loraplex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"loraplex_server/csrc/bgmv_cpu.cpp", "loraplex_server/csrc/decode_ops.cpp"} <= set(names)
    assert {f"loraplex_adapters/example_adapters/{name}/{file}" for name in ("sentiment", "topic", "replies")
            for file in ("adapter_config.json", "adapter_model.safetensors", "loraplex.json")} <= set(names)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    return wheel


def _client_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    # Without its own pip (ensurepip takes long): this pip installs into it with --python.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=_env(), timeout=120)
    _pip([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", str(wheel)],
         tmp)
    return venv


def _stop(process, client) -> None:
    client.close()
    process.kill()
    process.wait()


def test_the_wheel_alone_talks_to_a_server(tiny, tmp_path):
    port = free_port()
    with ThreadPoolExecutor(1) as pool:  # the server starts while the wheel builds
        started = pool.submit(start_server, tiny("llama")[0], tmp_path / "store", port)
        try:
            venv = _client_venv(tmp_path, _build_wheel(tmp_path))
        except BaseException:  # a skip included: stop the server first
            _stop(*started.result())
            raise
    process, client = started.result()
    try:
        python = str(venv / "bin" / "python")
        probe = subprocess.run([python, "-c", "import torch"], cwd=tmp_path, env=_env(), capture_output=True,
                               text=True)
        assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
        result = subprocess.run([python, "-c", CLIENT_SCRIPT, f"127.0.0.1:{port}"], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok")
        cli = subprocess.run([str(venv / "bin" / "loraplex"), "health", "--server", f"127.0.0.1:{port}"],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        assert (cli.returncode, cli.stdout) == (0, "SERVING\n"), cli.stderr
    finally:
        _stop(process, client)
