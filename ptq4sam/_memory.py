"""Large CPU tensors without a page fault per page: glibc's malloc serves allocations above its mmap threshold
(128 KB, raised dynamically up to 32 MB) with a fresh ``mmap`` and returns them with ``munmap`` when freed, so every
large tensor a forward or a reconstruction step allocates is faulted in again page by page (measured: a third of a
W4A4 run's CPU time in the kernel). :func:`keep_freed_memory` makes malloc serve every size from its heap and keep
freed memory for reuse (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` 1 GiB): the process keeps its peak memory, and stops
paying the faults. Called when ``ptq4sam`` is imported; ``PTQ4SAM_MALLOC=default`` leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_done = False


def keep_freed_memory() -> bool:
    """Set the glibc malloc options above (once); False where there is no glibc or ``PTQ4SAM_MALLOC=default``."""
    global _done
    if _done:
        return True
    if os.environ.get("PTQ4SAM_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _done
