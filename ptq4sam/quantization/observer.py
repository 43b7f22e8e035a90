"""Observers: collect statistics and turn them into (scale, zero_point). They never quantize anything.

All observers reduce over every axis except ``ch_axis`` (per-channel) or over everything (``ch_axis=-1``,
per-tensor). The MSE search is vectorised over channels and candidate ranges (no Python loop per channel).
"""
from __future__ import annotations

from typing import Dict, Tuple, Type

import torch
from torch import nn


def memory_order(x: torch.Tensor):
    """``x``'s dimensions from the outermost in memory to the innermost (e.g. N, H, W, C for channels-last)."""
    return sorted(range(x.dim()), key=lambda d: -x.stride(d))


def channel_view(x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """(C, N) view of ``x`` for per-channel statistics, or (1, N) for per-tensor (ch_axis=-1)."""
    if ch_axis == -1:
        if not x.is_contiguous():  # a dense tensor in another layout (channels-last, permuted): a view, no copy
            xp = x.permute(memory_order(x))
            if xp.is_contiguous():
                return xp.reshape(1, -1)
        return x.reshape(1, -1)
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)


def subsample(xc: torch.Tensor, max_samples: int) -> torch.Tensor:
    """Deterministic pseudo-random subset of each row's columns (a strided subset would alias with the channel
    layout of the flattened tensor and could miss whole channels)."""
    n = xc.shape[-1]
    if not max_samples or n <= max_samples:
        return xc
    gen = torch.Generator().manual_seed(n)
    idx = torch.randperm(n, generator=gen)[:max_samples].to(xc.device)
    return xc.index_select(-1, idx)


def data_range(x: torch.Tensor, ch_axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per channel, or of the whole tensor as shape (1,), in any memory layout without a copy."""
    if ch_axis == -1:
        lo, hi = torch.aminmax(x)
        return lo.reshape(1), hi.reshape(1)
    dims = [d for d in range(x.dim()) if d != ch_axis % x.dim()]
    return x.amin(dim=dims), x.amax(dim=dims)


def qrange(bit: int, symmetric: bool) -> Tuple[int, int]:
    if symmetric:
        return -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    return 0, 2 ** bit - 1


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, bit: int, symmetric: bool,
                       eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uniform affine quantization parameters covering [min_val, max_val] (which always includes 0)."""
    qmin, qmax = qrange(bit, symmetric)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if symmetric:
        absmax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(absmax / ((qmax - qmin) / 2), min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale, zero_point


def fake_quant_ref(x, scale, zero_point, qmin, qmax):
    """Plain uniform fake quantization (broadcasting), used by the observers' search."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


class ObserverBase(nn.Module):
    def __init__(self, bit: int = 8, symmetric: bool = False, ch_axis: int = -1):
        super().__init__()
        self.bit, self.symmetric, self.ch_axis = bit, symmetric, ch_axis
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.num_batches = 0

    def extra_repr(self) -> str:
        return f"bit={self.bit}, symmetric={self.symmetric}, ch_axis={self.ch_axis}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        xd = x.detach().float()
        lo, hi = self.batch_range(xd, *data_range(xd, self.ch_axis))
        self.update(lo, hi)
        self.num_batches += 1
        return x

    def batch_range(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """This batch's range from the tensor ``x`` and its per-channel (or whole-tensor) min / max."""
        return lo, hi

    def update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.num_batches == 0 or self.min_val.shape != lo.shape:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.num_batches == 0:
            raise RuntimeError(f"{type(self).__name__} saw no data: run calibration before computing qparams")
        return qparams_from_range(self.min_val, self.max_val, self.bit, self.symmetric)


class MinMaxObserver(ObserverBase):
    """Running min / max over all calibration batches."""


class AvgMinMaxObserver(ObserverBase):
    """Average over batches of each batch's min / max."""

    def update(self, lo, hi):
        if self.num_batches == 0 or self.min_val.shape != lo.shape:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            n = self.num_batches
            self.min_val = (self.min_val * n + lo) / (n + 1)
            self.max_val = (self.max_val * n + hi) / (n + 1)


class MSEObserver(ObserverBase):
    """Range that minimises the Lp error of fake quantization (p=2.4 as in the paper), per channel.

    Candidates shrink the observed [min, max] by ratios in (0, 1]; for each channel the best candidate is kept.
    Batches are combined with a running min / max of the chosen ranges (weights: one batch).
    """

    def __init__(self, bit=8, symmetric=False, ch_axis=-1, p: float = 2.4, num_candidates: int = 100,
                 max_elements: int = 1 << 24, max_samples: int = 2048, exact: bool = False):
        super().__init__(bit, symmetric, ch_axis)
        self.p, self.num_candidates, self.max_elements = p, num_candidates, max_elements
        # above max_samples per channel the errors come from per-channel histograms (2048 bins per tensor, 512 per
        # channel), unless ``exact`` (set for weights, which are observed once)
        self.max_samples, self.exact = max_samples, exact

    def candidates(self, lo: torch.Tensor, hi: torch.Tensor):
        ratios = torch.linspace(1.0 / self.num_candidates, 1.0, self.num_candidates, device=lo.device)
        return lo[None] * ratios[:, None], hi[None] * ratios[:, None]  # (K, C)

    def lp_errors(self, xc: torch.Tensor, cand_lo: torch.Tensor, cand_hi: torch.Tensor) -> torch.Tensor:
        """(K, C) Lp error of every candidate range on every channel, computed in candidate chunks."""
        qmin, qmax = qrange(self.bit, self.symmetric)
        k_total, c = cand_lo.shape
        chunk = max(1, self.max_elements // max(1, xc.numel()))
        errs = []
        for k0 in range(0, k_total, chunk):
            scale, zp = qparams_from_range(cand_lo[k0:k0 + chunk], cand_hi[k0:k0 + chunk], self.bit, self.symmetric)
            xq = fake_quant_ref(xc[None], scale[..., None], zp[..., None], qmin, qmax)
            errs.append((xq - xc[None]).abs().pow(self.p).mean(-1))
        return torch.cat(errs)

    def lp_errors_hist(self, xc: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cand_lo: torch.Tensor,
                       cand_hi: torch.Tensor, bins: int = 2048) -> torch.Tensor:
        """(K, C) Lp errors of every candidate range on every channel from one ``bins``-bin histogram per channel
        (bin centres weighted by counts): one pass over the data, then O(K * C * bins) instead of O(K * C * N).
        Agrees with :meth:`lp_errors` on all samples (tested, per tensor and per channel)."""
        qmin, qmax = qrange(self.bit, self.symmetric)
        c, n = xc.shape
        width = (hi - lo).clamp(min=1e-12)
        if c == 1:  # one tensor: torch.histc
            count = torch.histc(xc, bins, float(lo[0]), float(lo[0] + width[0]))[None]
        else:  # one histogram per channel through a single bincount over (channel, bin) indices
            idx = ((xc - lo[:, None]) * (bins / width)[:, None]).to(torch.int32).clamp_(0, bins - 1)
            idx += (torch.arange(c, device=xc.device, dtype=torch.int32) * bins)[:, None]
            count = torch.bincount(idx.reshape(-1), minlength=c * bins).reshape(c, bins).to(xc.dtype)
        # each bin represented by its centre (a bin is 1/32 of a 4-bit step per channel, 1/128 per tensor)
        centre = lo[:, None] + (torch.arange(bins, device=xc.device, dtype=xc.dtype)[None] + 0.5) * (width / bins)[:, None]
        chunk = max(1, self.max_elements // (c * bins))
        errs = []
        for k0 in range(0, cand_lo.shape[0], chunk):
            scale, zp = qparams_from_range(cand_lo[k0:k0 + chunk], cand_hi[k0:k0 + chunk], self.bit, self.symmetric)
            xq = fake_quant_ref(centre[None], scale[..., None], zp[..., None], qmin, qmax)
            errs.append(((xq - centre[None]).abs().pow(self.p) * count[None]).sum(-1) / n)
        return torch.cat(errs)

    def batch_range(self, x, lo, hi):
        xc = channel_view(x, self.ch_axis)
        cand_lo, cand_hi = self.candidates(lo, hi)
        if xc.shape[1] > self.max_samples and not self.exact:  # many samples per channel: histograms
            # of all the data: a subsample would miss the rare outliers whose clipping error decides the range
            err = self.lp_errors_hist(xc, lo, hi, cand_lo, cand_hi, bins=2048 if xc.shape[0] == 1 else 512)
        else:
            err = self.lp_errors(xc, cand_lo, cand_hi)
        best = err.argmin(0)  # (C,)
        idx = torch.arange(xc.shape[0], device=xc.device)
        return cand_lo[best, idx], cand_hi[best, idx]


class AvgMSEObserver(MSEObserver):
    """MSE range per batch, averaged over batches (the paper's activation observer)."""

    update = AvgMinMaxObserver.update


class PercentileObserver(ObserverBase):
    """Range from the lower/upper ``percentile`` of each batch (per channel), averaged over batches."""

    def __init__(self, bit=8, symmetric=False, ch_axis=-1, percentile: float = 99.99, max_samples: int = 1 << 20):
        super().__init__(bit, symmetric, ch_axis)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile, self.max_samples = percentile, max_samples

    def batch_range(self, x, lo, hi):
        xc = subsample(channel_view(x, self.ch_axis), self.max_samples)  # keeps the quantile's cost bounded
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=xc.device)
        lo, hi = torch.quantile(xc, q, dim=1)
        return lo, hi

    update = AvgMinMaxObserver.update


OBSERVERS: Dict[str, Type[ObserverBase]] = {
    "MinMaxObserver": MinMaxObserver,
    "AvgMinMaxObserver": AvgMinMaxObserver,
    "MSEObserver": MSEObserver,
    "AvgMSEObserver": AvgMSEObserver,
    "PercentileObserver": PercentileObserver,
    # names used by the paper repo's yamls
    "MSEFastObserver": MSEObserver,
    "AvgMSEFastObserver": AvgMSEObserver,
}
