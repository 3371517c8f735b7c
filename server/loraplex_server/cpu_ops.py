"""Our CPU kernels (csrc/), compiled once with the machine's C++ compiler and cached by torch: the first
build takes tens of seconds, later starts load it from torch's extension cache.

They register as `torch.ops.loraplex.*`: the batched LoRA decode kernel (bgmv_cpu.cpp), the small ops of our
model's step and its decode attention (decode_ops.cpp), and the GEMM over bf16-stored weights (bf16_linear.cpp).
Everything falls back to plain torch (None here) when there is no compiler or LORAPLEX_CPU_KERNEL=0.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))


def _target() -> str:
    """The -march the kernels are built for: this CPU, or LORAPLEX_CPU_ARCH (e.g. haswell, skylake-avx512), which
    runs a lesser CPU's paths here (tests of the other CPU kinds)."""
    return os.environ.get("LORAPLEX_CPU_ARCH", "native")


def _cpu_key() -> str:
    """A short hash of this CPU's instruction-set flags and the target. torch's cache keys only on sources and
    flags: a cache shared by machines of different CPUs (a mounted home, a volume) must not hand one of them a
    -march=native binary with instructions it lacks."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(f"{flags} {_target()}".encode()).hexdigest()[:10]


def cpu_ops():
    """The `torch.ops.loraplex` namespace with the compiled kernels, or None when unavailable or switched off
    (LORAPLEX_CPU_KERNEL=0, read at each call: models built later take the torch path)."""
    if os.environ.get("LORAPLEX_CPU_KERNEL", "1") == "0":
        return None
    return _built()


@cache
def _built():
    started = time.perf_counter()
    log.info("preparing the CPU kernels (the first build takes up to a minute)")
    try:
        from torch.utils.cpp_extension import load

        load(name=f"loraplex_cpu_ops_{_cpu_key()}", sources=[str(s) for s in SOURCES], is_python_module=False,
             verbose=False, extra_cflags=["-O3", f"-march={_target()}", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the torch path still works
        log.warning("CPU kernels unavailable, using the torch path: %s", exc)
        return None
    log.info("CPU kernels ready in %.1f s", time.perf_counter() - started)
    # torch.compile (LORAPLEX_COMPILE) traces the decode step through bf16_linear: its output's shape.
    torch.library.register_fake("loraplex::bf16_linear")(
        lambda x, packed, bias, out_features: x.new_empty(x.shape[0], out_features))
    return torch.ops.loraplex
