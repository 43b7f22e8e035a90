"""Where OpenVINO spends a compiled model's time, and which kernels actually ran: its per-node performance counters
(``PERF_COUNT``) summed by (layer type, kernel). The kernel name (``exec_type``, e.g. ``jit_gemm_i8``,
``brgemm_avx2_f32``) says the precision the arithmetic ran in; the runtime precision of a node
(:meth:`ptq4sam.deploy.runtime._OvGraph.runtime_precisions`) can say ``u8`` for a layer whose integer weights are only
stored compressed and decompressed to f32 inside a float kernel (``FullyConnectedCompressed``)."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .runtime import _OvGraph

# a kernel computes in integers when its name carries an integer precision (OpenVINO's CPU plugin: "jit_gemm_i8",
# "brgconv_avx2_I8", "ref_u8", ...); a Convert / Reorder / Transpose on integer data only moves them
_INT_KERNEL = re.compile(r"(^|_)(i8|u8|I8|U8)($|_)")
_MOVES_DATA = {"Convert", "Reorder", "Transpose", "Reshape", "Concatenation", "Input", "Output"}


def integer_kernel(layer_type: str, exec_type: str) -> bool:
    """Whether a node of ``layer_type`` executed by kernel ``exec_type`` does its arithmetic on integers."""
    return bool(_INT_KERNEL.search(exec_type)) and layer_type not in _MOVES_DATA


def summarize(counters: List[Dict]) -> List[Dict]:
    """Per-node counters ``{"layer_type", "exec_type", "ms"}`` (summed over the timed runs) -> one row per
    (layer type, kernel): ``{"layer_type", "exec_type", "nodes", "ms", "integer"}``, the slowest first. Nodes that did
    not run (``exec_type`` "undef": constants, folded parts) are left out."""
    rows: Dict[tuple, Dict] = {}
    for c in counters:
        if c["exec_type"] in ("undef", ""):
            continue
        key = (c["layer_type"], c["exec_type"])
        r = rows.setdefault(key, {"layer_type": key[0], "exec_type": key[1], "nodes": 0, "ms": 0.0,
                                  "integer": integer_kernel(*key)})
        r["nodes"] += 1
        r["ms"] += c["ms"]
    return sorted(rows.values(), key=lambda r: -r["ms"])


def profile(path, feeds: Dict[str, np.ndarray], threads: int = 0, runs: int = 5, warmup: int = 2) -> Dict:
    """Compile ``path`` (ONNX or OpenVINO IR) on the CPU with performance counters, run ``feeds`` ``warmup`` + ``runs``
    times; return ``{"rows": summarize(...) (ms: the mean over the timed runs), "total_ms": the rows' sum, "wall_ms":
    the median wall time of a run}``. The counters are per node; with several threads their sum need not equal the
    wall time (nodes overlap, and counting costs time), so compare models by ``wall_ms``."""
    req = _OvGraph(Path(path), threads, {"PERF_COUNT": True}).req
    for _ in range(warmup):
        req.infer(feeds)
    acc: Dict[str, Dict] = {}
    wall = []
    for _ in range(runs):
        t = time.perf_counter()
        req.infer(feeds)
        wall.append(1000 * (time.perf_counter() - t))
        for p in req.profiling_info:
            c = acc.setdefault(p.node_name, {"layer_type": p.node_type, "exec_type": p.exec_type, "ms": 0.0})
            c["ms"] += p.real_time.total_seconds() * 1000 / runs
    rows = summarize(list(acc.values()))
    for r in rows:
        r["ms"] = round(r["ms"], 2)
    return {"rows": rows, "total_ms": round(sum(r["ms"] for r in rows), 1),
            "wall_ms": round(float(np.median(wall)), 1)}


def integer_share(rows: List[Dict], layer_types: Optional[tuple] = None) -> Dict[str, int]:
    """``{"integer": n, "float": m}`` nodes among ``layer_types`` (all when None) of :func:`summarize`'s rows."""
    out = {"integer": 0, "float": 0}
    for r in rows:
        if layer_types is None or r["layer_type"] in layer_types:
            out["integer" if r["integer"] else "float"] += r["nodes"]
    return out
