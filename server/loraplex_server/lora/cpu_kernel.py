"""The optional CPU decode kernel (csrc/bgmv_cpu.cpp), compiled once and cached by torch (the first build
takes tens of seconds; later starts load it from torch's extension cache).

Falls back to the plain torch path (None) when there is no compiler or LORAPLEX_CPU_KERNEL=0.
"""

from __future__ import annotations

import logging
import os
import time
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "bgmv_cpu.cpp"


@cache
def bgmv_kernel():
    """The compiled module with `bgmv_add_`, or None when unavailable."""
    if os.environ.get("LORAPLEX_CPU_KERNEL", "1") == "0":
        return None
    started = time.perf_counter()
    log.info("preparing the CPU LoRA decode kernel (the first build takes up to a minute)")
    try:
        from torch.utils.cpp_extension import load

        module = load(name="loraplex_bgmv_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native",
                      "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the torch path still works
        log.warning("CPU LoRA decode kernel unavailable, using the torch path: %s", exc)
        return None
    log.info("CPU LoRA decode kernel ready in %.1f s", time.perf_counter() - started)
    return module
