"""The closest check of the Docker image that runs without a Docker engine: build the image's filesystem
by following the Dockerfile itself, step by step, under a temporary root, then start its ENTRYPOINT and
probe it with its HEALTHCHECK.

What cannot run here is swapped, and nothing else: the CUDA base image (no registry; this machine's
Python stands in for the image's python3), `apt-get` (the image's system packages), the CUDA torch index
(the CPU build of the same pinned torch), and the GPU settings (`LORAPLEX_DEVICE=cpu`, no quantization).
Every other line runs as written: the venv, the COPYs, the pip installs under constraints.txt, the base
conversion, the example adapters published into the volume's store, the entrypoint and the healthcheck.

    python .ci/docker_check.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The image's settings a CPU-only machine cannot honour.
CPU_OVERRIDES = {"LORAPLEX_DEVICE": "cpu", "LORAPLEX_QUANTIZE": "none"}
START_TIMEOUT = 900  # seconds: the first start converts nothing (done at build), but loads torch cold


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined, out = "", []
    for line in dockerfile.read_text().splitlines():
        if not joined and (not line.strip() or line.lstrip().startswith("#")):
            continue
        joined += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            word, _, rest = joined.partition(" ")
            out.append((word.upper(), rest.strip()))
            joined = ""
    return out


def parse_env(text: str, env: dict[str, str]) -> dict[str, str]:
    pairs = {}
    for token in shlex.split(text):
        key, _, value = token.partition("=")
        pairs[key] = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], ""), value)
    return pairs


class ImageBuild:
    def __init__(self, root: Path) -> None:
        self.root = root
        # The build machine's own settings (how pip reaches packages) stay; the project's do not leak in.
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("LORAPLEX_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        self.workdir = root
        root.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, list[str]] = {"EXPOSE": [], "VOLUME": [], "HEALTHCHECK": [], "ENTRYPOINT": []}

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def rooted(self, text: str) -> str:
        """Absolute image paths in a command or setting, moved under the build root."""
        return re.sub(r"(?<![\w.:/-])(/(?:opt|app|data|var/cache)\b)", lambda m: str(self.root) + m[1], text)

    def run(self, command: str) -> None:
        steps = []
        for step in command.split("&&"):
            step = step.strip()
            if step.startswith(("apt-get", "rm -rf /var/lib/apt")):  # the image's system packages
                print(f"  (skipped here: {step[:60]})")
                continue
            step = re.sub(r"--index-url \S+/whl/cu\d+", "", step)  # the CPU build of the same torch
            steps.append(step.replace("python3 -m venv", f"{sys.executable} -m venv", 1))
        if not steps:
            return
        script = self.rooted(" && ".join(steps))
        print(f"  RUN {script}", flush=True)
        subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=self.workdir, env=self.env, check=True)

    def apply(self, word: str, rest: str) -> None:
        if word == "FROM":
            print(f"  (base image {rest}: this machine's Python stands in)")
        elif word == "ENV":
            self.env.update({k: self.rooted(v) for k, v in parse_env(rest, self.env).items()})
        elif word == "WORKDIR":
            self.workdir = self.path(rest)
            self.workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":  # Docker's rules: a folder's contents go into the target
            *sources, target = shlex.split(rest)
            destination = self.workdir / target if not target.startswith("/") else self.path(target)
            for source in map(REPO.joinpath, sources):
                if source.is_dir():
                    shutil.copytree(source, destination, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                elif len(sources) > 1 or target.endswith("/"):
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, destination / source.name)
                else:
                    shutil.copy2(source, destination)
        elif word == "RUN":
            self.run(rest)
        elif word == "EXPOSE":
            self.meta[word] = rest.split()
        elif word in ("ENTRYPOINT", "HEALTHCHECK"):  # exec form only: ["prog", "arg", ...]
            form = rest.split("CMD", 1)[1] if word == "HEALTHCHECK" else rest
            self.meta[word] = json.loads(form)
        elif word == "VOLUME":
            self.meta[word] = rest.split()
        elif word not in ("LABEL", "ARG", "USER", "STOPSIGNAL"):
            raise SystemExit(f"docker_check does not know the instruction {word}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_and_probe(build: ImageBuild) -> None:
    healthcheck = build.meta["HEALTHCHECK"]
    grpc_port, http_port = free_port(), free_port()
    exposed = {p.split("/")[0] for p in build.meta["EXPOSE"]}
    assert {"50051", "8000"} <= exposed, f"the gRPC and HTTP ports must be exposed, got {sorted(exposed)}"
    env = {**build.env, **CPU_OVERRIDES, "LORAPLEX_HOST": "127.0.0.1", "LORAPLEX_PORT": str(grpc_port),
           "LORAPLEX_HTTP_PORT": str(http_port), "LORAPLEX_METRICS_PORT": "0",
           "LORAPLEX_SERVER": f"127.0.0.1:{grpc_port}"}
    entry = build.meta["ENTRYPOINT"]
    print(f"  ENTRYPOINT {entry} (gRPC {grpc_port}, HTTP {http_port})", flush=True)
    server = subprocess.Popen(entry, cwd=build.workdir, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while subprocess.run(healthcheck, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, f"the entrypoint exited with {server.returncode}"
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(2)
        print("  HEALTHCHECK passed", flush=True)
        listing = subprocess.run(["loraplex", "adapters", "list"], env=env, capture_output=True, text=True)
        assert all(name in listing.stdout for name in ("sentiment", "topic", "replies")), \
            f"the image's store lacks the examples:\n{listing.stdout}{listing.stderr}"
        label = subprocess.run(["loraplex", "classify", "--adapter", "sentiment", "awful"], env=env,
                               capture_output=True, text=True, check=True).stdout.split("\t")[0]
        assert label == "negative", label
        print("  the volume's store serves the examples", flush=True)
    finally:
        server.terminate()
        code = server.wait(timeout=120)
    assert code == 0, f"the server exited with {code} on SIGTERM"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build under this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="loraplex-image-"))
    try:
        build = ImageBuild(root)
        for word, rest in instructions(REPO / "Dockerfile"):
            print(f"{word} {rest[:100]}", flush=True)
            build.apply(word, rest)
        start_and_probe(build)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("docker check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
