"""Progress bars and phase timings for long loops.

On a terminal: tqdm bars with an ETA. Written to a file or a CI log (stdout not a TTY): plain lines, one every
``interval`` seconds and one at the end, so logs stay readable (no carriage-return spam). ``PTQ4SAM_PROGRESS=lines``
or ``=bar`` forces either; ``=off`` silences them.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Dict, Iterable, Optional

from tqdm import tqdm


def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 60:d}:{s % 60:02d}"


class LineProgress:
    """tqdm's interface (iteration, ``set_postfix``, ``close``) printing one plain line now and then."""

    def __init__(self, iterable: Iterable, desc: str = "", total: Optional[int] = None, interval: float = 30.0,
                 leave: bool = True, file=None):
        self.iterable, self.desc, self.interval, self.leave = iterable, desc, interval, leave
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.file = file or sys.stdout
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.time()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self, done: bool = False) -> str:
        el = time.time() - self.t0
        tot = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if not done and self.total and self.n:
            eta = f" eta {_fmt(el / self.n * (self.total - self.n))}"
        rate = f", {self.n / el:.2f} it/s" if el > 0 else ""
        post = f" [{self.postfix}]" if self.postfix else ""
        return f"{self.desc}: {self.n}{tot} in {_fmt(el)}{eta}{rate}{post}{' done' if done else ''}"

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.n += 1
            now = time.time()
            if now - self.last >= self.interval and (self.total is None or self.n < self.total):
                self.last = now
                print(self._line(), file=self.file, flush=True)
        self.close()

    def close(self) -> None:
        if self.leave and self.n:
            print(self._line(done=True), file=self.file, flush=True)
        self.leave = False  # once


class _Silent(LineProgress):
    def __iter__(self):
        yield from self.iterable


def progress(iterable: Iterable, desc: str = "", total: Optional[int] = None, leave: bool = True,
             interval: float = 30.0):
    """A progress bar for ``iterable`` (see the module docstring for the output modes)."""
    mode = os.environ.get("PTQ4SAM_PROGRESS", "bar" if sys.stdout.isatty() else "lines")
    if mode == "off":
        return _Silent(iterable, desc, total)
    if mode == "lines":
        return LineProgress(iterable, desc, total, interval=interval, leave=leave)
    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True, file=sys.stdout, mininterval=1)


class PhaseTimer:
    """Wall time of named phases: ``with timer.phase('calibration'): ...``; ``summary()`` is one line."""

    def __init__(self):
        self.times: Dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.time() - t, 2)

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = round(self.times.get(name, 0.0) + seconds, 2)

    def summary(self) -> str:
        total = sum(self.times.values())
        return "time per phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.times.items()) + \
            f" (total {total:.1f}s)"
