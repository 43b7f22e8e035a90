"""AGQ (Adaptive Granularity Quantization) search: pick tau (base 2^(1/tau)) and scale s per attention.

``search='paper'`` (the paper's ``LogAvgMSEFastObserver``): for each tau and each calibration image, a bounded scalar
minimisation (scipy's ``minimize_scalar``, method 'bounded') of the image's mean ``|Q(attn; s, tau) @ v - attn @ v|^p``
over s in [min(0.1, 0.01 amax), amax]; tau = argmin of the per-image optimal errors summed over images, s = the mean of
that tau's per-image optima (:class:`PaperAGQSearch`, fed one image at a time).
``search='grid'`` (an option, not the paper's): one joint argmin over tau x ``scale_ratios`` * amax of the errors
summed over the images (:func:`search_tau`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .quantization.logq import EPS, agq_from_log_, agq_nonzero_levels


def candidate_grid(amax: float, taus: Sequence[int], scale_ratios: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor([float(x) for x in taus for _ in scale_ratios])
    s = torch.tensor([amax * r for _ in taus for r in scale_ratios])
    return t, s


def _quantize_log(log_attn: torch.Tensor, tau: float, s: float, levels: int, work: torch.Tensor) -> torch.Tensor:
    """The AGQ grid (:mod:`ptq4sam.quantization.logq`) of a softmax map from its ln, in ``work``: the same bits as the
    quantizer gives with scale ``s`` (a float32 scale, as the quantizer holds it)."""
    return agq_from_log_(log_attn, torch.tensor(s, dtype=torch.float32), tau, levels, out=work)


@torch.no_grad()
def agq_errors(pairs: List[Tuple[torch.Tensor, torch.Tensor]], taus: torch.Tensor, scales: torch.Tensor, bit: int,
               p: float = 2.4, levels_mode: str = "paper") -> torch.Tensor:
    """(K,) summed Lp error of attn.v for each candidate (taus[k], scales[k]) over the (attn, v) pairs.

    The log of each softmax map is taken once; each candidate then costs a few in-place passes over one work
    buffer."""
    levels = agq_nonzero_levels(bit, levels_mode)
    err = torch.zeros(taus.numel(), dtype=torch.float64)
    for attn, v in pairs:
        ref = attn @ v
        log_attn = attn.clamp(min=EPS).log_()
        work = torch.empty_like(log_attn)
        for k in range(taus.numel()):
            q = _quantize_log(log_attn, float(taus[k]), float(scales[k]), levels, work)
            err[k] += float((q @ v - ref).abs_().pow_(p).sum())
    return err


def search_tau(pairs, bit: int, taus=(1, 2, 4), scale_ratios=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5), p: float = 2.4,
               levels_mode: str = "paper") -> Dict:
    """Best (tau, s) for one attention from its recorded float (softmax output, v) pairs."""
    amax = max(float(a.max()) for a, _ in pairs)
    t, s = candidate_grid(amax, taus, scale_ratios)
    err = agq_errors(pairs, t, s, bit, p, levels_mode)
    best = int(err.argmin())
    per_tau = {int(tau): float(err[t == tau].min()) for tau in taus}
    return {"tau": int(t[best]), "scale": float(s[best]), "error": float(err[best]), "error_per_tau": per_tau}


@torch.no_grad()
def agq_error(attn: torch.Tensor, log_attn: torch.Tensor, v: torch.Tensor, ref: torch.Tensor, tau: float, s: float,
              levels: int, p: float, work: torch.Tensor) -> float:
    """Mean |Q(attn; s, tau) @ v - attn @ v|^p, computed in the work buffer ``work`` (``log_attn`` = ln attn), with
    ``levels`` non-zero levels."""
    q = _quantize_log(log_attn, tau, s, levels, work)
    return float((q @ v - ref).abs_().pow_(p).mean())


class PerImageScaleSearch:
    """The softmax quantizers' per-image search (the paper's AGQ search; AHCQ-SAM's LNQ search): for each candidate
    of a grid (AGQ's tau, LNQ's alpha) and each calibration image, a bounded scalar minimisation of the image's mean
    ``|Q(attn; s) @ v - attn @ v|^p`` over s in :meth:`bounds`; the candidate = argmin of the per-image optimal errors
    summed over the images (the first of equal sums), s = the mean of its per-image optima. Subclasses give
    ``name`` (the result key), :meth:`bounds` and :meth:`error_fns`; fed one image at a time (:meth:`add`)."""

    name = "candidate"

    def __init__(self, candidates: Sequence, p: float):
        self.candidates, self.p = list(candidates), p
        self.errors = [0.0] * len(self.candidates)
        self.scales: List[List[float]] = [[] for _ in self.candidates]

    def bounds(self, amax: float) -> Tuple[float, float]:
        raise NotImplementedError

    def error_fns(self, attn: torch.Tensor, v: torch.Tensor, ref: torch.Tensor) -> List:
        """One function s -> error per candidate, for this image (they may share work buffers)."""
        raise NotImplementedError

    @torch.no_grad()
    def add(self, attn: torch.Tensor, v: torch.Tensor) -> None:
        from scipy.optimize import minimize_scalar  # noqa: PLC0415

        attn, v = attn.float(), v.float()
        amax = float(attn.max())
        if amax <= 0:
            return
        for k, fn in enumerate(self.error_fns(attn, v, attn @ v)):
            res = minimize_scalar(fn, bounds=self.bounds(amax), method="bounded")
            self.errors[k] += float(res.fun)
            self.scales[k].append(float(res.x))

    def result(self) -> Dict:
        if not self.scales[0]:
            raise ValueError(f"{type(self).__name__} saw no softmax map")
        best = min(range(len(self.candidates)), key=lambda k: (self.errors[k], k))  # the first of equal errors
        return {self.name: self.candidates[best], "scale": sum(self.scales[best]) / len(self.scales[best]),
                "error": self.errors[best], f"error_per_{self.name}": dict(zip(self.candidates, self.errors)),
                "images": len(self.scales[best])}


class PaperAGQSearch(PerImageScaleSearch):
    """The paper's AGQ search for one attention (module docstring): candidates tau, s in [min(0.1, 0.01 amax), amax]."""

    name = "tau"

    def __init__(self, bit: int, taus: Sequence[int] = (1, 2, 4), p: float = 2.4, levels_mode: str = "paper"):
        super().__init__([int(t) for t in taus], p)
        self.bit, self.levels = bit, agq_nonzero_levels(bit, levels_mode)

    def bounds(self, amax):
        return min(0.1, 0.01 * amax), amax

    def error_fns(self, attn, v, ref):
        log_attn = attn.clamp(min=EPS).log()  # the paper clamps the softmax at 1e-20
        work = torch.empty_like(log_attn)
        return [lambda s, tau=tau: agq_error(attn, log_attn, v, ref, tau, s, self.levels, self.p, work)
                for tau in self.candidates]

    def result(self) -> Dict:
        return {**super().result(), "search": "paper"}
