"""AGQ (Adaptive Granularity Quantization) search: pick tau (base 2^(1/tau)) and scale s per attention.

The search minimises sum_images || Q(attn; s, tau) @ v - attn @ v ||_p^p over a grid of (tau, s) candidates,
evaluated in batches of candidates on the tensors' device (no per-candidate optimisation loop).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .quantization import agq_quantize


def candidate_grid(amax: float, taus: Sequence[int], scale_ratios: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor([float(x) for x in taus for _ in scale_ratios])
    s = torch.tensor([amax * r for _ in taus for r in scale_ratios])
    return t, s


@torch.no_grad()
def agq_errors(pairs: List[Tuple[torch.Tensor, torch.Tensor]], taus: torch.Tensor, scales: torch.Tensor, bit: int,
               p: float = 2.4, max_elements: int = 1 << 25) -> torch.Tensor:
    """(K,) summed Lp error of attn.v for each candidate (taus[k], scales[k]) over the (attn, v) pairs."""
    k_total = taus.numel()
    err = torch.zeros(k_total, dtype=torch.float64)
    for attn, v in pairs:
        ref = attn @ v
        chunk = max(1, max_elements // max(1, attn.numel()))
        for k0 in range(0, k_total, chunk):
            t = taus[k0:k0 + chunk].to(attn.device)
            s = scales[k0:k0 + chunk].to(attn.device)
            shape = (-1,) + (1,) * attn.dim()
            q = agq_quantize(attn[None], s.reshape(shape), t.reshape(shape), 2 ** bit)
            e = (q @ v[None] - ref[None]).abs().pow(p).flatten(1).sum(1)
            err[k0:k0 + chunk] += e.double().cpu()
    return err


def search_tau(pairs, bit: int, taus=(1, 2, 4), scale_ratios=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5), p: float = 2.4) -> Dict:
    """Best (tau, s) for one attention from its recorded float (softmax output, v) pairs."""
    amax = max(float(a.max()) for a, _ in pairs)
    t, s = candidate_grid(amax, taus, scale_ratios)
    err = agq_errors(pairs, t, s, bit, p)
    best = int(err.argmin())
    per_tau = {int(tau): float(err[t == tau].min()) for tau in taus}
    return {"tau": int(t[best]), "scale": float(s[best]), "error": float(err[best]), "error_per_tau": per_tau}
