"""LNQ search (AHCQ-SAM): pick alpha and s of one attention's softmax quantizer (:mod:`ptq4sam.quantization.lnq`).

For each alpha of the grid and each calibration image, a bounded scalar minimisation (scipy's ``minimize_scalar``,
method 'bounded') of the image's mean ``|Q(attn; s, alpha) @ v - attn @ v|^p`` over s in [max(1e-4, 0.1 amax), amax]
(amax: the image's largest softmax value; v: the attention's float values, all heads pooled into one error); alpha =
argmin of the per-image optimal errors summed over the images, s = the mean of that alpha's per-image optima (the
authors' ``LogTransformObserver``; their p = 2.4)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .quantization.lnq import lnq_max_code, lnq_reference

ALPHAS = (0.001, 0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)  # the authors' grid


@torch.no_grad()
def lnq_error(attn: torch.Tensor, v: torch.Tensor, ref: torch.Tensor, alpha: float, s: float, max_code: int,
              p: float) -> float:
    """Mean |Q(attn; s, alpha) @ v - attn @ v|^p (``ref`` = attn @ v)."""
    q = lnq_reference(attn, torch.tensor(s, dtype=torch.float32), alpha, max_code)
    return float((q @ v - ref).abs_().pow_(p).mean())


class LNQSearch:
    """The LNQ search for one attention, one calibration image at a time (:meth:`add`), then :meth:`result`."""

    def __init__(self, bit: int, alphas: Sequence[float] = ALPHAS, p: float = 2.4):
        self.bit, self.alphas, self.p = bit, [float(a) for a in alphas], p
        self.max_code = lnq_max_code(bit)
        self.errors = [0.0] * len(self.alphas)
        self.scales: List[List[float]] = [[] for _ in self.alphas]

    @torch.no_grad()
    def add(self, attn: torch.Tensor, v: torch.Tensor) -> None:
        from scipy.optimize import minimize_scalar  # noqa: PLC0415

        attn, v = attn.float(), v.float()
        amax = float(attn.max())
        if amax <= 0:
            return
        ref = attn @ v
        for k, alpha in enumerate(self.alphas):
            res = minimize_scalar(lambda s: lnq_error(attn, v, ref, alpha, s, self.max_code, self.p),
                                  bounds=(max(1e-4, 0.1 * amax), amax), method="bounded")
            self.errors[k] += float(res.fun)
            self.scales[k].append(float(res.x))

    def result(self) -> Dict:
        if not self.scales[0]:
            raise ValueError("LNQ search saw no softmax map")
        best = min(range(len(self.alphas)), key=lambda k: (self.errors[k], k))  # the first of equal errors
        return {"alpha": self.alphas[best], "scale": sum(self.scales[best]) / len(self.scales[best]),
                "error": self.errors[best], "error_per_alpha": dict(zip(self.alphas, self.errors)),
                "images": len(self.scales[best])}
