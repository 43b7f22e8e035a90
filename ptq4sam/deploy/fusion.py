"""Which forms of a quantized attention OpenVINO's CPU plugin fuses into one attention kernel.

OpenVINO tokenizes ``MatMul -> [eltwise] -> Softmax -> [eltwise] -> MatMul`` into a ``Subgraph`` (its MHA snippet)
only when every operation between the two MatMuls is one it admits; an attention it does not fuse runs as separate
MatMul / Softmax / eltwise nodes. :func:`probe` builds one small attention per form -- the post-softmax operations
our export would write (:mod:`ptq4sam.deploy.onnx_export`), or a candidate -- exports it to ONNX, compiles it and
reports what the compiled model runs (and, asked, how long one inference takes). ``tools/ov_attention_fusion.py``
prints the table for this machine."""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..quantization.logq import LN2, agq_reference

SHAPE = (16, 4, 49, 32)  # (windows x batch, heads, tokens, head dim): a TinyViT 7x7 window attention


def _qdq_u8(p: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(p, 1 / 255, 0, 0, 255)


def _qdq_s8(t: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(t, 0.03, 0, -128, 127)


def _agq(p: torch.Tensor) -> torch.Tensor:  # the exported AGQ: Log, Round, Clip, Exp and the zero branch (Where)
    return agq_reference(p, torch.tensor(1.0), 2.0, 256)


def _agq_one_chain(p: torch.Tensor) -> torch.Tensor:  # AGQ without the zero branch: Log in a single chain
    k = torch.round(torch.log(torch.clamp(p, min=1e-20)) * (-2.0 / LN2)).clamp(0, 255)
    return torch.exp(k * (-LN2 / 2.0))


def _power_law(p: torch.Tensor) -> torch.Tensor:  # a log-free non-uniform grid: Pow, a uniform QDQ, Pow
    return torch.pow(_qdq_u8(torch.pow(torch.clamp(p, min=0.0), 0.25)), 4.0)


def _flush_select(p: torch.Tensor) -> torch.Tensor:  # a uniform QDQ and a Where (a second consumer of its output)
    q = _qdq_u8(p)
    return torch.where(q < 0.01, torch.zeros_like(q), q)


# name -> (post-softmax operation, q / k quantized, v quantized)
FORMS: Dict[str, Tuple[Callable, bool, bool]] = {
    "float (attention.placement: float)": (lambda p: p, False, False),
    "softmax uniform QDQ": (_qdq_u8, False, False),
    "softmax AGQ (exported form)": (_agq, False, False),
    "softmax AGQ, one chain (Log, no zero branch)": (_agq_one_chain, False, False),
    "softmax power-law (Pow, QDQ, Pow)": (_power_law, False, False),
    "softmax uniform QDQ + Where": (_flush_select, False, False),
    "q, k symmetric QDQ; softmax.v float (attention.placement: nncf)": (lambda p: p, True, False),
    "q, k, v QDQ; softmax uniform QDQ": (_qdq_u8, True, True),
    "q, k, v QDQ; softmax AGQ (the paper's placement)": (_agq, True, True),
}


class _Attention(torch.nn.Module):
    def __init__(self, post: Callable, qk: bool, v: bool):
        super().__init__()
        self.post, self.qk, self.v = post, qk, v

    def forward(self, q, k, v):
        if self.qk:
            q, k = _qdq_s8(q), _qdq_s8(k)
        if self.v:
            v = _qdq_s8(v)
        a = torch.softmax(q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1])), dim=-1)
        return self.post(a) @ v


def _precisions(compiled) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Input", "Output", "Parameter", "Result", "Const"):
            continue
        key = f"{kind}:{info['runtimePrecision'].astype(str)}"
        out[key] = out.get(key, 0) + 1
    return out


def probe(forms: Optional[List[str]] = None, threads: int = 2, repeats: int = 0,
          shape: Tuple[int, ...] = SHAPE) -> List[Dict]:
    """[{form, fused, ops[, ms]}] for each form (all by default), compiled in f32 (no bf16 on CPUs that have it):
    ``fused`` = no MatMul or Softmax left outside a Subgraph; ``ms`` (with ``repeats`` > 0): the median time of one
    inference, the forms timed in turn (round robin, so that a machine's load changes them alike), after 3 warm-up
    rounds."""
    import openvino as ov  # noqa: PLC0415

    core, compiled = ov.Core(), {}
    names = forms or list(FORMS)
    x = tuple(torch.randn(shape, generator=torch.Generator().manual_seed(j)) for j in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            post, qk, v = FORMS[name]
            path = Path(tmp) / f"form{i}.onnx"
            torch.onnx.export(_Attention(post, qk, v), x, str(path), opset_version=17, dynamo=False,
                              input_names=["q", "k", "v"])
            compiled[name] = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                    "INFERENCE_PRECISION_HINT": "f32"})
    rows = []
    for name, cm in compiled.items():
        ops = _precisions(cm)
        rows.append({"form": name, "fused": not any(k.split(":")[0] in ("MatMul", "Softmax") for k in ops),
                     "ops": ops})
    if repeats > 0:
        feeds = [t.numpy() for t in x]
        reqs = [cm.create_infer_request() for cm in compiled.values()]
        times: List[List[float]] = [[] for _ in reqs]
        for r in range(3 + repeats):
            for req, ts in zip(reqs, times):
                t = time.perf_counter()
                req.infer(feeds)
                if r >= 3:
                    ts.append(time.perf_counter() - t)
        for row, ts in zip(rows, times):
            row["ms"] = round(1000 * statistics.median(ts), 2)
    return rows
