"""Large CPU tensors without a page fault per 4 KB page (ptq4sam/_memory.py): what importing ptq4sam sets, measured
in a fresh process by the kernel's own counters (minor faults, huge pages of the process)."""
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = r"""
import json, re, resource, sys
import ptq4sam  # before torch allocates anything
import torch
torch.set_num_threads(1)
n = 64 * 2 ** 20 // 4  # 64 MB, far above glibc's largest mmap threshold (32 MB)
x = torch.ones(n)
huge = int(re.search(r"AnonHugePages:\s+(\d+)", open("/proc/self/smaps_rollup").read()).group(1))
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # the pattern of a reconstruction step: a large tensor made, used, freed
    y = torch.empty(n)
    y.fill_(1.0)
    del y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"huge_kb": huge, "faults": faults}))
"""


def _probe(**env):
    return _probe_once(tuple(sorted(env.items())))


@functools.lru_cache(maxsize=None)  # the same probe for two tests on a worker: one process
def _probe_once(env_items):
    e = {k: v for k, v in os.environ.items() if k not in ("PTQ4SAM_MALLOC", "THP_MEM_ALLOC_ENABLE")}
    e.update(dict(env_items))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=e, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    try:
        return re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)
    except (OSError, AttributeError):
        return "unknown"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc are Linux's")
def test_importing_ptq4sam_stops_the_page_faults_of_large_tensors_made_and_freed():
    default = _probe(PTQ4SAM_MALLOC="default")  # glibc / PyTorch as they come: a fresh mmap per tensor
    ours = _probe()
    pages = 10 * 64 * 2 ** 20 // 4096
    assert default["faults"] >= 0.9 * pages, default  # every 4 KB page of every tensor faulted in again
    assert ours["faults"] < 0.1 * default["faults"], (ours, default)  # reused, 2 MB pages: measured 40-100x fewer


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages off in this kernel")
def test_importing_ptq4sam_puts_large_tensors_on_huge_pages_unless_turned_off():
    assert _probe()["huge_kb"] >= 32 * 1024  # most of the 64 MB tensor in 2 MB pages
    assert _probe(THP_MEM_ALLOC_ENABLE="0")["huge_kb"] == 0 or _thp_mode() == "always"
    assert _probe(PTQ4SAM_MALLOC="default")["huge_kb"] == 0 or _thp_mode() == "always"
