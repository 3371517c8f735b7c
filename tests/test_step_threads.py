"""CPU threads per engine step (engine/step_threads.py): a server keeps one CPU for its front ends during
steps of a few decode rows and computes larger steps on every thread; `--threads N` fixes the count."""

from __future__ import annotations

import logging

import pytest
import torch

from loraplex_server.app.options import build_parser
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.sampling import SamplingParams
from loraplex_server.engine.step_threads import LARGE_STEP_TOKENS, StepThreads, step_threads, usable_cpus


@pytest.fixture
def restored_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_auto_keeps_one_cpu_back_for_small_steps_only(restored_threads):
    auto = step_threads(0, torch.device("cpu"))
    assert auto.large == torch.get_num_threads()
    assert auto.small == max(1, min(auto.large, usable_cpus() - 1))
    assert step_threads(0, torch.device("cuda")) is None and step_threads(3, torch.device("meta")) is None


def test_a_fixed_count_is_used_for_every_step_and_capped_at_the_cpus(caplog, restored_threads):
    assert (step_threads(1, torch.device("cpu")).small, step_threads(1, torch.device("cpu")).large) == (1, 1)
    cpus = usable_cpus()
    with caplog.at_level(logging.WARNING):
        many = step_threads(cpus + 1000, torch.device("cpu"))
    assert (many.small, many.large) == (cpus, cpus)
    assert f"more than the {cpus} CPUs" in caplog.text


def test_the_option_refuses_what_is_not_a_count(capsys):
    assert build_parser().parse_args([]).threads == 0
    assert build_parser().parse_args(["--threads", "3"]).threads == 3
    for bad in ("-1", "two", "1.5", ""):
        with pytest.raises(SystemExit):
            build_parser().parse_args([f"--threads={bad}"])
        assert "--threads" in capsys.readouterr().err


def test_an_engine_sets_the_threads_of_each_step(tiny, restored_threads):
    """On the thread that steps: a decode step of one row on `small`, a prompt of LARGE_STEP_TOKENS on `large`."""
    base_dir, _ = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device="cpu"),
                    threads=StepThreads(1, 2))
    seen = []
    request = GenerationRequest(list(range(5, 5 + LARGE_STEP_TOKENS)), None,
                                SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.submit(request)
    while engine.has_work:
        engine.step()
        seen.append((engine.last_step[1], torch.get_num_threads()))
    assert seen[0] == (LARGE_STEP_TOKENS, 2)  # the prompt
    assert seen[1:] == [(1, 1)] * (len(seen) - 1) and len(seen) >= 3  # its decode steps
