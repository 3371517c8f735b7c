"""The README's quick start, taken from the README itself, against a fresh `loraplex serve` on the
embedded base with an empty default store (a temporary HOME): the shipped example adapters must be
published on that first start, and every command and snippet must print what the README shows.

Caches stay shared (the converted base and the compiled CPU kernel, under XDG_CACHE_HOME): they are
speed, not state a new user would see.
"""

from __future__ import annotations

import doctest
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import free_port, start_server_command

README = Path(__file__).parents[1] / "README.md"
README_ADDRESS = "127.0.0.1:50051"
SCORE_TOLERANCE = 0.05  # scores move by a few thousandths between bf16 and fp32 CPUs

pytestmark = pytest.mark.slow


def quick_start_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quick start")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def fenced_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def console_steps(block: str) -> list[tuple[str, list[str]]]:
    """(command, the lines the README shows it printing) for each `$ ` line of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def same_line(expected: str, actual: str) -> bool:
    """Equal, field by tab-separated field, except numbers, which may differ by SCORE_TOLERANCE."""
    want, got = expected.rstrip().split("\t"), actual.rstrip().split("\t")
    if len(want) != len(got):
        return False
    for a, b in zip(want, got, strict=True):
        try:
            if not math.isclose(float(a), float(b), abs_tol=SCORE_TOLERANCE):
                return False
        except ValueError:
            if a != b:
                return False
    return True


def test_the_readme_has_a_quick_start_to_run():
    section = quick_start_section()
    steps = [step for block in fenced_blocks(section, "console") for step in console_steps(block)]
    assert len(steps) >= 3 and all(expected for _, expected in steps), "every command shows its output"
    assert len(fenced_blocks(section, "pycon")) == 1


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_DATA_HOME", "LORAPLEX_ADAPTER_DIR")}
    env.update(HOME=str(home), XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
    port = free_port()
    command = [sys.executable, "-m", "loraplex_server.app.serve", "--port", str(port), "--metrics-port", "0",
               "--http-port", "0"]
    process, client = start_server_command(command, port, env=env, client_kwargs={"timeout": 60})
    yield env, f"127.0.0.1:{port}", home
    client.close()
    process.terminate()
    process.wait(timeout=60)


def test_first_start_publishes_the_examples_into_the_default_store(fresh_server):
    _, _, home = fresh_server
    store = home / ".local" / "share" / "loraplex" / "adapters" / "adapters"
    assert sorted(p.name for p in store.iterdir()) == ["replies", "sentiment", "topic"]


def test_readme_commands_print_what_the_readme_shows(fresh_server):
    env, address, _ = fresh_server
    loraplex = str(Path(sys.executable).parent / "loraplex")
    for block in fenced_blocks(quick_start_section(), "console"):
        for command, expected in console_steps(block):
            argv = shlex.split(command)
            assert argv[0] == "loraplex"
            done = subprocess.run([loraplex, *argv[1:]], env={**env, "LORAPLEX_SERVER": address},
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (command, done.stderr)
            printed = (done.stdout + done.stderr).rstrip("\n").splitlines()
            assert len(printed) == len(expected) and all(map(same_line, expected, printed)), \
                f"$ {command}\nREADME:\n" + "\n".join(expected) + "\nprinted:\n" + "\n".join(printed)


def test_readme_python_snippet_prints_what_the_readme_shows(fresh_server):
    _, address, _ = fresh_server
    (snippet,) = fenced_blocks(quick_start_section(), "pycon")
    test = doctest.DocTestParser().get_doctest(snippet.replace(README_ADDRESS, address), {}, "README quick start",
                                               str(README), 0)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    try:
        runner.run(test, out=report.append)
    finally:
        if "c" in test.globs:  # the snippet's client
            test.globs["c"].close()
    assert runner.failures == 0, "".join(report)
