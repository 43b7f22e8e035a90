"""Timing several runtimes' models fairly on one machine (tools/benchmark_deploy.py, tools/ort_conv_forms.py)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence

import numpy as np

from ..progress import progress


def decoder_boxes(n: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """(n, 4) float32 prompt boxes for timing a decoder graph: one box near the middle of a 256-px input, each copy
    moved by under a pixel (``rng``), times ``scale`` (the input size / 256)."""
    return (np.tile(np.array([[20, 30, 180, 200]], np.float32), (n, 1)) + rng.random((n, 4)).astype(np.float32)) * scale


def interleaved_medians(fns: Sequence[Callable[[], object]], warmup: int, repeats: int) -> List[float]:
    """Median ms of each of ``fns``, timed in rounds (every function once per round, ``repeats`` rounds, after
    ``warmup`` calls each): a slow spell of the machine (another process, a throttled core) then touches every model
    alike instead of the one timed during it, which back-to-back medians let one model's number absorb."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    ts: List[List[float]] = [[] for _ in fns]
    for _ in progress(range(repeats), desc="timing rounds"):
        for t_fn, fn in zip(ts, fns):
            t = time.perf_counter()
            fn()
            t_fn.append(time.perf_counter() - t)
    return [1000 * statistics.median(t_fn) for t_fn in ts]
