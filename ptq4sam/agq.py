"""AGQ (Adaptive Granularity Quantization) search: pick tau (base 2^(1/tau)) and scale s per attention.

The search minimises sum_images || Q(attn; s, tau) @ v - attn @ v ||_p^p over a grid of (tau, s) candidates,
evaluated candidate by candidate in one work buffer on the tensors' device (no optimisation loop).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch


def candidate_grid(amax: float, taus: Sequence[int], scale_ratios: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor([float(x) for x in taus for _ in scale_ratios])
    s = torch.tensor([amax * r for _ in taus for r in scale_ratios])
    return t, s


@torch.no_grad()
def agq_errors(pairs: List[Tuple[torch.Tensor, torch.Tensor]], taus: torch.Tensor, scales: torch.Tensor, bit: int,
               p: float = 2.4) -> torch.Tensor:
    """(K,) summed Lp error of attn.v for each candidate (taus[k], scales[k]) over the (attn, v) pairs.

    log2 of each softmax map is taken once; each candidate then costs a few in-place passes over one work buffer
    (x_int = round(-tau * (log2 x - log2 s)), the AGQ formula of :func:`agq_quantize` with log2(x/s) split)."""
    levels = 2 ** bit
    err = torch.zeros(taus.numel(), dtype=torch.float64)
    for attn, v in pairs:
        ref = attn @ v
        log_attn = attn.clamp(min=1e-30).log2_()
        work = torch.empty_like(log_attn)
        for k in range(taus.numel()):
            tau, s = float(taus[k]), float(scales[k])
            t = torch.sub(log_attn, math.log2(s), out=work).mul_(-tau).round_().clamp_(min=0)
            drop = t >= levels
            q = t.div_(-tau).exp2_().mul_(s).masked_fill_(drop, 0.0)
            err[k] += float((q @ v - ref).abs_().pow_(p).sum())
    return err


def search_tau(pairs, bit: int, taus=(1, 2, 4), scale_ratios=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5), p: float = 2.4) -> Dict:
    """Best (tau, s) for one attention from its recorded float (softmax output, v) pairs."""
    amax = max(float(a.max()) for a, _ in pairs)
    t, s = candidate_grid(amax, taus, scale_ratios)
    err = agq_errors(pairs, t, s, bit, p)
    best = int(err.argmin())
    per_tau = {int(tau): float(err[t == tau].min()) for tau in taus}
    return {"tau": int(t[best]), "scale": float(s[best]), "error": float(err[best]), "error_per_tau": per_tau}
