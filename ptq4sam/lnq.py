"""LNQ search (AHCQ-SAM): pick alpha and s of one attention's softmax quantizer (:mod:`ptq4sam.quantization.lnq`).

For each alpha of the grid and each calibration image, a bounded scalar minimisation (scipy's ``minimize_scalar``,
method 'bounded') of the image's mean ``|Q(attn; s, alpha) @ v - attn @ v|^p`` over s in [max(1e-4, 0.1 amax), amax]
(amax: the image's largest softmax value; v: the attention's float values, all heads pooled into one error); alpha =
argmin of the per-image optimal errors summed over the images, s = the mean of that alpha's per-image optima (the
authors' ``LogTransformObserver``; their p = 2.4)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .agq import PerImageScaleSearch
from .quantization.lnq import lnq_from_log, lnq_log, lnq_max_code

ALPHAS = (0.001, 0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)  # the authors' grid


@torch.no_grad()
def lnq_error(attn: torch.Tensor, v: torch.Tensor, ref: torch.Tensor, alpha: float, s: float, max_code: int,
              p: float, log_attn: Optional[torch.Tensor] = None) -> float:
    """Mean |Q(attn; s, alpha) @ v - attn @ v|^p (``ref`` = attn @ v; ``log_attn`` = ``lnq_log(attn, alpha)`` if
    already computed: the same bits)."""
    log_attn = lnq_log(attn, alpha) if log_attn is None else log_attn
    q = lnq_from_log(log_attn, torch.tensor(s, dtype=torch.float32, device=attn.device), alpha, max_code)
    return float((q @ v - ref).abs_().pow_(p).mean())


class LNQSearch(PerImageScaleSearch):
    """The LNQ search for one attention (module docstring): candidates alpha, s in [max(1e-4, 0.1 amax), amax]."""

    name = "alpha"

    def __init__(self, bit: int, alphas: Sequence[float] = ALPHAS, p: float = 2.4):
        super().__init__([float(a) for a in alphas], p)
        self.bit, self.max_code = bit, lnq_max_code(bit)

    def bounds(self, amax):
        return min(max(1e-4, 0.1 * amax), amax), amax

    def error_fns(self, attn, v, ref):
        held = {}  # the transformed map of the alpha being searched (computed once per alpha, not per s)

        def fn(s, a):
            if held.get("alpha") != a:
                held.clear()
                held.update(alpha=a, log=lnq_log(attn, a))
            return lnq_error(attn, v, ref, a, s, self.max_code, self.p, held["log"])
        return [lambda s, a=a: fn(s, a) for a in self.candidates]
