"""The optional CPU decode kernel (csrc/bgmv_cpu.cpp), compiled once on first use and cached by torch.

Falls back to the plain torch path (None) when there is no compiler or LORAPLEX_CPU_KERNEL=0.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "bgmv_cpu.cpp"


@cache
def bgmv_kernel():
    """The compiled module with `bgmv_add_`, or None when unavailable."""
    if os.environ.get("LORAPLEX_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="loraplex_bgmv_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native",
                    "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the torch path still works
        log.warning("CPU LoRA decode kernel unavailable, using the torch path: %s", exc)
        return None
