"""Decode steps replayed per bucket: CUDA graphs on GPU, `torch.compile` on CPU (nano-vllm's capture).

A step whose rows are all single-token generation rows (pure decode) is padded up to a row bucket
(1, 2, 4, 8, then multiples of 16) and a context bucket (powers of two), and run through the step
captured for that (rows, context) pair: its inputs are static buffers (DecodeBuffers) filled in place
before each replay. Padding rows repeat the first row exactly (same token, position, adapter and
cache position), so they write the very values that row writes and change nothing; their outputs
are dropped. Any other step (a prefill chunk, a classification text) runs the eager forward.

Modes (`LORAPLEX_COMPILE`; "1" = the device's capture, "0" = off): "cuda_graph" (captured graphs),
"compile" (inductor, static shapes per bucket), "eager" (the same buffers and replay, no capture: what
the CPU tests use to check the bookkeeping), "off" (no bucketing: the eager forward for every step).
Off by default: on this project's 2-core CPU compiling a bucket of SmolLM2 takes minutes for a step
about 1.3x faster, and the CUDA graphs have not yet been timed (or run) on a GPU. A captured graph
holds the slot tables' addresses, so the graphs are dropped and captured again when a table is
replaced (more slots, a higher rank, a newly adapted layer). Warm-up captures the smallest buckets
at start, within a time bound, logging progress.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex_server.engine.kv_cache import PagedKVCache
from loraplex_server.engine.models.decode_step import DecodeBuffers, decode_hidden
from loraplex_server.engine.models.llama import LlamaForward
from loraplex_server.engine.planner import PlannedRow

log = logging.getLogger(__name__)
MODES = ("off", "eager", "compile", "cuda_graph")
MIN_CONTEXT = 64
WARMUP_SECONDS = float(os.environ.get("LORAPLEX_WARMUP_S", "120"))


def compile_mode(device: torch.device) -> str:
    """The mode LORAPLEX_COMPILE asks for ("1" = the device's capture, "0" or unset = off)."""
    wanted = os.environ.get("LORAPLEX_COMPILE", "0")
    capture = "cuda_graph" if device.type == "cuda" else "compile"
    mode = {"1": capture, "0": "off"}.get(wanted, wanted)
    if mode not in MODES or (mode == "cuda_graph" and device.type != "cuda"):
        raise ValueError(f"LORAPLEX_COMPILE={wanted!r}: choose 0, 1, {', '.join(MODES)} (cuda_graph on CUDA only)")
    return mode


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_rows (and max_rows itself)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return buckets + [max_rows]


def pick(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `value`, or None when none does."""
    return next((b for b in buckets if b >= value), None)


def context_bucket(tokens: int, limit: int) -> int:
    """The next power of two >= tokens (at least MIN_CONTEXT), capped at `limit`."""
    bucket = MIN_CONTEXT
    while bucket < tokens:
        bucket *= 2
    return min(bucket, max(limit, tokens))


@dataclass
class CapturedStep:
    buffers: DecodeBuffers
    run: Callable[[], torch.Tensor]  # replays the step on the buffers; returns hidden [rows, hidden]


class StepGraphs:
    """Captured decode steps by (rows, context) bucket, over one model and KV cache."""

    def __init__(self, model: LlamaForward, cache: PagedKVCache, device: torch.device, mode: str, max_rows: int,
                 max_context: int) -> None:
        self.model, self.cache, self.device, self.mode = model, cache, device, mode
        self.buckets = row_buckets(max_rows)
        self.max_context = max_context
        self.steps: dict[tuple[int, int], CapturedStep] = {}
        self.captures = 0  # how many steps were captured (or compiled) so far
        self.replayed: set[tuple[int, int]] = set()  # the buckets steps have run in
        self._signature: tuple = ()
        self._pool = None
        self._compiled = torch.compile(decode_hidden, dynamic=False) if mode == "compile" else None

    def accepts(self, planned: list[PlannedRow]) -> bool:
        """A pure decode step that fits the largest bucket."""
        return (len(planned) <= self.buckets[-1]
                and all(p.is_generation and len(p.token_ids) == 1 for p in planned))

    def run(self, planned: list[PlannedRow]) -> torch.Tensor:
        """Hidden states [len(planned), hidden] of a pure decode step (accepts() must hold)."""
        self._check_tables()
        lengths = [p.start + 1 for p in planned]
        key = (pick(len(planned), self.buckets), context_bucket(max(lengths), self.max_context))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._capture(*key)
        self._fill(step.buffers, planned, lengths)
        self.replayed.add(key)
        return step.run()[:len(planned)]

    def _fill(self, b: DecodeBuffers, planned: list[PlannedRow], lengths: list[int]) -> None:
        """Write the step's rows into the buffers; padding rows repeat row 0."""
        rows, context, cache = b.rows, b.context, self.cache
        order = list(range(len(planned))) + [0] * (rows - len(planned))
        index = torch.empty(rows, context, dtype=torch.long)
        mask = torch.zeros(rows, 1, 1, context, dtype=torch.bool)
        for i, p in enumerate(planned):
            positions = cache.slot_index(p.row.blocks, 0, lengths[i])
            index[i, :lengths[i]] = positions
            index[i, lengths[i]:] = positions[0]  # a written position: masked, but never garbage (NaN)
            mask[i, ..., :lengths[i]] = True
        pick_rows = torch.tensor(order)
        host = torch.tensor([[p.token_ids[0], p.start, p.row.slot] for p in planned], dtype=torch.long)[pick_rows]
        b.ids.copy_(host[:, 0], non_blocking=True)
        b.positions.copy_(host[:, 1], non_blocking=True)
        b.slots.copy_(host[:, 2], non_blocking=True)
        index = index[pick_rows]
        b.kv_index.copy_(index, non_blocking=True)
        b.write_index.copy_(index[torch.arange(rows), host[:, 1]], non_blocking=True)
        b.kv_mask.copy_(mask[pick_rows], non_blocking=True)

    def _check_tables(self) -> None:
        """Drop every captured step when an adapter table was replaced or a layer newly adapted."""
        signature = tuple((layer.lora_A.data_ptr(), tuple(layer.lora_A.shape), layer.lora_B_t.data_ptr())
                          for decoder in self.model.layers for projection in decoder.projections
                          for layer, _, _ in projection.adapters)
        if signature != self._signature:
            if self.steps:
                log.info("adapter tables changed: %d captured decode steps dropped", len(self.steps))
            self.steps.clear()
            self._signature = signature

    def _capture(self, rows: int, context: int) -> CapturedStep:
        buffers = DecodeBuffers.allocate(rows, context, self.device)
        # A valid step to capture with: token 0 at cache position 0, attending to itself only. That
        # position may hold a running row's token: it is put back afterwards.
        buffers.kv_mask[..., 0] = True
        saved = [(k[0].clone(), v[0].clone()) for k, v in zip(self.cache.keys, self.cache.values, strict=True)]
        self.captures += 1
        started = time.perf_counter()
        if self.mode == "cuda_graph":
            step = self._cuda_graph(buffers)
        elif self.mode == "compile":
            compiled = self._compiled
            compiled(self.model, self.cache, buffers)  # compiles now, not inside a request's step
            step = CapturedStep(buffers, lambda: compiled(self.model, self.cache, buffers))
        else:
            step = CapturedStep(buffers, lambda: decode_hidden(self.model, self.cache, buffers))
        for (key, value), keys, values in zip(saved, self.cache.keys, self.cache.values, strict=True):
            keys[0], values[0] = key, value
        log.info("decode step captured for %d rows x %d context (%s) in %.1f s", rows, context, self.mode,
                 time.perf_counter() - started)
        return step

    def _cuda_graph(self, buffers: DecodeBuffers) -> CapturedStep:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # allocator and library warm-up outside the capture
                decode_hidden(self.model, self.cache, buffers)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = decode_hidden(self.model, self.cache, buffers)
        self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return output
        return CapturedStep(buffers, replay)

    def warm_up(self, rows: list[int] | None = None, seconds: float = WARMUP_SECONDS) -> int:
        """Capture the smallest context bucket for the given row buckets (default: all) until `seconds`
        are spent: CUDA graphs largest first (as nano-vllm does, so smaller graphs reuse its memory
        pool), compiled steps smallest first (the buckets a lightly loaded server uses)."""
        self._check_tables()
        wanted = sorted(rows or self.buckets, reverse=self.mode == "cuda_graph")
        started = time.perf_counter()
        done = 0
        for i, count in enumerate(wanted):
            if time.perf_counter() - started > seconds:
                log.info("decode warm-up stopped after %.0f s (%d of %d buckets); the rest are captured on "
                         "first use", seconds, done, len(wanted))
                break
            key = (count, context_bucket(MIN_CONTEXT, self.max_context))
            if key not in self.steps:
                self.steps[key] = self._capture(*key)
            done += 1
            log.info("decode warm-up %d/%d buckets (%.0f s)", i + 1, len(wanted), time.perf_counter() - started)
        return done
