"""How many CPU threads each engine step computes on, when the engine shares its CPUs with the server's
front ends.

A step of a few decode rows is bound by memory bandwidth, which one thread less barely changes (one thread
read 23 GB/s on a 2-core machine, two 29), while each token it yields wakes the event loop, the HTTP or gRPC
stream and often a client on the same machine. With every CPU in the OpenMP team those threads preempt a
team member, and the team waits for it at the next barrier: there a served stream decoded 44 tok/s on both
threads and 49-61 tok/s with one kept free (vLLM's CPU backend likewise keeps a CPU for its scheduler).
Steps of more rows are bound by compute, and their tokens are fewer per unit of work: 16 streams served
230-250 tok/s on both threads against 170-210 with one kept free. So only the small steps keep one back.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

LARGE_STEP_TOKENS = 8  # steps of at least this many tokens compute on every thread


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class StepThreads:
    """Sets torch's intra-op threads before each step (on the engine's own thread: OpenMP keeps the count per
    thread), changing it only when the step's kind changes."""

    def __init__(self, small: int, large: int) -> None:
        self.small, self.large = small, large
        self._current = 0

    def apply(self, tokens: int) -> None:
        wanted = self.large if tokens >= LARGE_STEP_TOKENS else self.small
        if wanted != self._current:
            torch.set_num_threads(wanted)
            self._current = wanted


def step_threads(requested: int, device: torch.device) -> StepThreads | None:
    """`--threads`: N computes every step on N threads; 0 (auto) gives steps of under 8 tokens one CPU less
    than torch's count (OMP_NUM_THREADS, else the cores), at least one, and larger steps all of them. None off
    the CPU."""
    if device.type != "cpu":
        return None
    if requested:
        cpus = usable_cpus()
        if requested > cpus:
            log.warning("--threads %d is more than the %d CPUs this process may use; using %d", requested, cpus, cpus)
        return StepThreads(min(requested, cpus), min(requested, cpus))
    large = torch.get_num_threads()
    return StepThreads(max(1, min(large, usable_cpus() - 1)), large)
