"""Large CPU tensors without a page fault per page. glibc's malloc serves allocations above its mmap threshold
(128 KB, raised dynamically up to 32 MB) with a fresh ``mmap`` and returns them with ``munmap`` when freed, so every
large tensor a forward or a reconstruction step allocates is faulted in again page by page, 4 KB at a time (measured
on a short W4A4 run: 76 million minor faults, system time a third of user time; docs/results.md, "CPU time").
Two settings, made when ``ptq4sam`` is imported (before torch allocates):

- :func:`keep_freed_memory`: malloc serves every size from its heap and keeps freed memory for reuse
  (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` 1 GiB): the process keeps its peak memory and stops paying the faults;
- :func:`huge_pages_for_tensors`: PyTorch's ``THP_MEM_ALLOC_ENABLE=1``, CPU tensors of 2 MB and more aligned to and
  advised for transparent huge pages (one fault per 2 MB; with the first, 10x fewer faults and less memory kept).

``PTQ4SAM_MALLOC=default`` leaves both as glibc and PyTorch set them; ``THP_MEM_ALLOC_ENABLE=0`` turns the second off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_done = False


def _off() -> bool:
    return os.environ.get("PTQ4SAM_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux")


def keep_freed_memory() -> bool:
    """Set the glibc malloc options above (once); False where there is no glibc or ``PTQ4SAM_MALLOC=default``."""
    global _done
    if _done:
        return True
    if _off():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _done


def huge_pages_for_tensors() -> bool:
    """``THP_MEM_ALLOC_ENABLE=1`` unless the user set it or ``PTQ4SAM_MALLOC=default``; True when it is on. PyTorch
    reads it once, at its first CPU allocation: set in a process that already allocated tensors it does nothing."""
    if _off():
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
