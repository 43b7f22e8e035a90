"""Where a run's CPU time goes: wall, user and system seconds, page faults and context switches of one command run
under several memory settings, one after another on the same machine (the kernel's own accounting of the child, as
``/usr/bin/time -v`` reports it).

    python tools/benchmark_cputime.py --json docs/results/cputime/demo.json -- \\
        make demo DEMO_WORK=/tmp/cputime-demo
    python tools/benchmark_cputime.py --json docs/results/cputime/w4a4.json -- \\
        .venv/bin/python ptq4sam/solver/test_quant.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py \\
        --q_config exp/recipes/w4a4-cpu.yaml --quant-encoder --max-images 8 --work-dir /tmp/cputime-w4a4

Settings (``--settings``, default all, each run ``--repeats`` times in turn):
  glibc    malloc as glibc sets it: large blocks are fresh mmaps, returned on free (``PTQ4SAM_MALLOC=default``)
  keep     malloc keeps freed memory for reuse (``ptq4sam._memory``), no huge pages (``THP_MEM_ALLOC_ENABLE=0``)
  keep+thp the toolkit's default: ``keep`` plus PyTorch's transparent huge pages for CPU tensors of 2 MB and more
Every run starts from empty toolkit caches (its own ``PTQ4SAM_CACHE_DIR``): the FP evaluation and the weight-range
searches are paid by each run alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptq4sam.cpuinfo import cpu_info, describe  # noqa: E402

SETTINGS = {
    "glibc": {"PTQ4SAM_MALLOC": "default"},
    "keep": {"THP_MEM_ALLOC_ENABLE": "0"},
    "keep+thp": {},
}


def run_once(cmd, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PTQ4SAM_MALLOC", "THP_MEM_ALLOC_ENABLE")}
    env.update(env_extra)
    with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryDirectory(prefix="cputime-cache-") as cache:
        env["PTQ4SAM_CACHE_DIR"] = cache  # every run from cold caches (FP evaluation, weight ranges), as on a new machine
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, ru = os.wait4(proc.pid, 0)  # the child and every process it waited for
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        log.seek(0)
        err = log.read()
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {rc}:\n{err[-2000:]}")
    return {"wall_s": round(wall, 1), "user_s": round(ru.ru_utime, 1), "system_s": round(ru.ru_stime, 1),
            "system_pct_of_user": round(100 * ru.ru_stime / max(ru.ru_utime, 1e-9), 1),
            "minor_faults": ru.ru_minflt, "major_faults": ru.ru_majflt, "max_rss_mb": round(ru.ru_maxrss / 1024),
            "voluntary_switches": ru.ru_nvcsw, "involuntary_switches": ru.ru_nivcsw}


def thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, interleaved (default 1)")
    p.add_argument("--json", default=None, help="write the table here")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to measure")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the command to measure after --")
    if a.repeats < 1:
        p.error(f"--repeats must be >= 1, got {a.repeats}")
    rows = []
    for rep in range(a.repeats):
        for name in a.settings:
            print(f"[{len(rows) + 1}/{a.repeats * len(a.settings)}] {name}: {' '.join(cmd)}", flush=True)
            r = {"setting": name, "repeat": rep, **run_once(cmd, SETTINGS[name])}
            print("   " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("setting", "repeat")), flush=True)
            rows.append(r)
    head = f"{'setting':<10}{'wall s':>8}{'user s':>9}{'sys s':>8}{'sys/user':>10}{'minor faults':>14}{'max RSS MB':>12}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['setting']:<10}{r['wall_s']:>8}{r['user_s']:>9}{r['system_s']:>8}{r['system_pct_of_user']:>9}%"
              f"{r['minor_faults']:>14}{r['max_rss_mb']:>12}")
    out = {"command": cmd, "cpu": describe(cpu_info()), "cpu_isa": cpu_info(), "cores": os.cpu_count(), "thp": thp_mode(),
           "kernel": platform.release(), "settings": {k: SETTINGS[k] for k in a.settings}, "runs": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
