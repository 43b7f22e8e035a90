"""Observers: collect statistics and turn them into (scale, zero_point). They never quantize anything.

All observers reduce over every axis except ``ch_axis`` (per-channel) or over everything (``ch_axis=-1``,
per-tensor). The MSE search is vectorised over channels and candidate ranges (no Python loop per channel).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type

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
        self.keep_batches = False  # True: also keep each batch's range in ``batches`` (grouped quantizers ask for it)
        self.batches: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def extra_repr(self) -> str:
        return f"bit={self.bit}, symmetric={self.symmetric}, ch_axis={self.ch_axis}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        xd = x.detach().float()
        lo, hi = self.batch_range(xd, *data_range(xd, self.ch_axis))
        self.keep_batch(lo, hi)
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

    def keep_batch(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Keep this batch's range in ``batches`` when ``keep_batches`` is on (grouped quantizers' ``batch`` ranges)."""
        if self.keep_batches:
            self.batches.append((lo.detach().clone(), hi.detach().clone()))

    def combine(self, ranges: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) this observer's ``update`` makes of the per-batch ``ranges`` (running min / max, or their
        average for the Avg observers); the observer's own state is left as it was (``update`` must build new
        tensors, not change ``min_val`` / ``max_val`` in place)."""
        if not ranges:
            raise RuntimeError(f"{type(self).__name__}: no batch ranges to combine (run calibration first)")
        saved = self.min_val, self.max_val, self.num_batches
        try:
            self.num_batches = 0
            for lo, hi in ranges:
                self.update(lo, hi)
                self.num_batches += 1
            return self.min_val, self.max_val
        finally:
            self.min_val, self.max_val, self.num_batches = saved

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

    ``search='paper'`` (the paper's ``MSEObserver``): data on one side of 0 (decided on the first batch) or a
    symmetric grid -> 1-D search of ``num_candidates`` thresholds t_i = i/num * max(|min|, max); otherwise a 2-D search
    over ranges r_i = i/num * (max(max, 0) - min(min, 0)) x every integer zero point, i.e. candidate grids
    [-z * delta_i, (qmax - z) * delta_i]. For each range the error is a (discrete) convex function of z (clipping only
    adds error, and more so the further a boundary moves into the data), so its minimum is found by a vectorised
    bisection on z: O(log 2^b) evaluations instead of 2^b, the same optimum as the brute-force loop (tested).
    ``search='shrink'`` (an option): a 1-D search (lo and hi shrunk by one ratio; the zero point never moves).
    Batches are combined with a running min / max of the chosen ranges (weights: one batch).
    """

    SEARCHES = ("paper", "shrink")

    def __init__(self, bit=8, symmetric=False, ch_axis=-1, p: float = 2.4, num_candidates: int = 100,
                 max_elements: int = 1 << 24, max_samples: int = 2048, exact: bool = False, search: str = "paper"):
        super().__init__(bit, symmetric, ch_axis)
        if search not in self.SEARCHES:
            raise ValueError(f"MSE observer search: expected one of {self.SEARCHES}, got {search!r}")
        self.p, self.num_candidates, self.max_elements = p, num_candidates, max_elements
        # above max_samples per channel the errors come from per-channel histograms (2048 bins per tensor, 512 per
        # channel), unless ``exact`` (set for weights, which are observed once)
        self.max_samples, self.exact, self.search = max_samples, exact, search
        self.one_side: Optional[str] = None  # 'pos' / 'neg' / 'no', fixed by the first batch (as the paper)

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

    @staticmethod
    def histogram(xc: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int):
        """(centres, counts), each (C, bins): one histogram per channel over [lo, hi] (``histc`` for one row, one
        ``bincount`` over (channel, bin) indices for many)."""
        c = xc.shape[0]
        width = (hi - lo).clamp(min=1e-12)
        if c == 1:
            count = torch.histc(xc, bins, float(lo[0]), float(lo[0] + width[0]))[None]
        else:
            idx = ((xc - lo[:, None]) * (bins / width)[:, None]).to(torch.int32).clamp_(0, bins - 1)
            idx += (torch.arange(c, device=xc.device, dtype=torch.int32) * bins)[:, None]
            count = torch.bincount(idx.reshape(-1), minlength=c * bins).reshape(c, bins).to(xc.dtype)
        # each bin represented by its centre (a bin is 1/32 of a 4-bit step per channel, 1/128 per tensor)
        centre = lo[:, None] + (torch.arange(bins, device=xc.device, dtype=xc.dtype)[None] + 0.5) * (width / bins)[:, None]
        return centre, count

    def lp_errors_hist(self, xc: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cand_lo: torch.Tensor,
                       cand_hi: torch.Tensor, bins: int = 2048) -> torch.Tensor:
        """(K, C) Lp errors of every candidate range on every channel from one ``bins``-bin histogram per channel
        (bin centres weighted by counts): one pass over the data, then O(K * C * bins) instead of O(K * C * N).
        Agrees with :meth:`lp_errors` on all samples (tested, per tensor and per channel)."""
        qmin, qmax = qrange(self.bit, self.symmetric)
        c, n = xc.shape
        centre, count = self.histogram(xc, lo, hi, bins)
        chunk = max(1, self.max_elements // (c * bins))
        errs = []
        for k0 in range(0, cand_lo.shape[0], chunk):
            scale, zp = qparams_from_range(cand_lo[k0:k0 + chunk], cand_hi[k0:k0 + chunk], self.bit, self.symmetric)
            xq = fake_quant_ref(centre[None], scale[..., None], zp[..., None], qmin, qmax)
            errs.append(((xq - centre[None]).abs().pow(self.p) * count[None]).sum(-1) / n)
        return torch.cat(errs)

    def _errors(self, xc, lo, hi, cand_lo, cand_hi):
        if xc.shape[1] > self.max_samples and not self.exact:  # many samples per channel: histograms
            # of all the data: a subsample would miss the rare outliers whose clipping error decides the range
            return self.lp_errors_hist(xc, lo, hi, cand_lo, cand_hi, bins=2048 if xc.shape[0] == 1 else 512)
        return self.lp_errors(xc, cand_lo, cand_hi)

    def _pick(self, err, cand_lo, cand_hi):
        best = err.argmin(0)  # (C,), the first of equal errors (the paper keeps a candidate only if strictly better)
        idx = torch.arange(err.shape[1], device=err.device)
        return cand_lo[best, idx], cand_hi[best, idx]

    def batch_range(self, x, lo, hi):
        xc = channel_view(x, self.ch_axis)
        if self.search == "shrink":
            cand_lo, cand_hi = self.candidates(lo, hi)
            return self._pick(self._errors(xc, lo, hi, cand_lo, cand_hi), cand_lo, cand_hi)
        if self.one_side is None:
            self.one_side = "pos" if float(lo.min()) >= 0 else "neg" if float(hi.max()) <= 0 else "no"
        if self.one_side != "no" or self.symmetric:  # the paper's perform_1D_search
            t = torch.maximum(lo.abs(), hi)
            ratios = torch.linspace(1.0 / self.num_candidates, 1.0, self.num_candidates, device=lo.device)
            thres = t[None] * ratios[:, None]
            cand_lo = torch.zeros_like(thres) if self.one_side == "pos" else -thres
            cand_hi = torch.zeros_like(thres) if self.one_side == "neg" else thres
            return self._pick(self._errors(xc, lo, hi, cand_lo, cand_hi), cand_lo, cand_hi)
        if xc.shape[1] > self.max_samples and not self.exact:
            values, weights = self.histogram(xc, lo, hi, 2048 if xc.shape[0] == 1 else 512)
        else:
            values, weights = xc, None
        return self.search_2d(values, weights, xc.shape[1], lo, hi)

    WARM_CHUNK = 8  # candidate ranges per descent in search_2d (each chunk starts where the previous one ended)

    @torch.no_grad()
    def search_2d(self, values: torch.Tensor, weights: Optional[torch.Tensor], n: int, lo: torch.Tensor,
                  hi: torch.Tensor):
        """The paper's 2-D search (ranges x zero points) on ``values`` (C, M) with optional ``weights`` (histogram
        counts; the error is their weighted sum / n). Returns the chosen (min, max) per channel.

        For each (range, channel) the error is convex in the zero point z, so a local minimum is the global one: a
        descent (one step at a time, only the rows still moving are evaluated) ends at the leftmost minimiser from
        any start. The widest ranges start from the z that places 0 where the data's range does; then the ranges are
        visited from wide to narrow in chunks, each range starting from the grid's lower end (-z * delta) extrapolated
        linearly from the previous two chunks' narrowest ranges (exact when the optimal grid keeps its lower end or
        its centre as it narrows): at 8 bits the minimiser of a narrow range sits up to 240 steps from the
        proportional start, a few from the extrapolated one. Same optimum as the brute-force loop (tested); ties between
        ranges go to the narrowest, as the paper's loop keeps a candidate only when strictly better."""
        qmax = qrange(self.bit, False)[1]
        lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
        c, m = values.shape
        num = self.num_candidates
        chunk = max(1, min(self.WARM_CHUNK, self.max_elements // max(1, values.numel())))
        z_wide = torch.round(qmax * -lo0 / (hi0 - lo0).clamp(min=1e-12)).clamp(0, qmax)  # (C,)
        seen = []  # (narrowest range index, its grid's lower end z * delta per channel) of the chunks done
        all_e = torch.empty(num, c, dtype=torch.float64, device=values.device)
        all_z = torch.empty(num, c, dtype=values.dtype, device=values.device)
        all_d = torch.empty(num, c, dtype=values.dtype, device=values.device)
        for i1 in range(num, 0, -chunk):  # wide to narrow
            i = torch.arange(max(1, i1 - chunk + 1), i1 + 1, device=values.device, dtype=values.dtype)
            delta = ((hi0 - lo0)[None] / num * i[:, None] / qmax).clamp(min=1e-8)  # (I, C)
            rows_v = values[None].expand(len(i), c, m).reshape(-1, m)
            rows_w = None if weights is None else weights[None].expand(len(i), c, m).reshape(-1, m)
            d = delta.reshape(-1)
            codes = torch.round(rows_v / d[:, None])  # (I*C, M): independent of the zero point

            def err(rows, z):  # error of zero point z on ``rows`` of (range, channel) (None: all of them)
                zq = z[:, None]
                cd, dd, vv, ww = codes, d[:, None], rows_v, rows_w
                if rows is not None:
                    cd, dd, vv = codes[rows], dd[rows], rows_v[rows]
                    ww = None if rows_w is None else rows_w[rows]
                v = torch.clamp(cd, -zq, qmax - zq).mul_(dd).sub_(vv).abs_().pow_(self.p)
                if ww is not None:
                    v.mul_(ww)
                return v.sum(-1, dtype=torch.float64) / n

            if not seen:
                start = z_wide.expand(len(i), c)
            else:  # the grid's lower end -z * delta, extrapolated linearly in the range from the last two chunks
                (ib, lb), (ia, la) = seen[-1], seen[-2] if len(seen) > 1 else seen[-1]
                low = lb[None] + (lb - la)[None] / (ib - ia) * (i[:, None] - ib) if ia != ib else lb[None]
                start = torch.round(low / delta).clamp(0, qmax)
            z = start.reshape(-1).clone()
            e = err(None, z)
            # direction: left if z-1 is not worse (leftmost minimiser), else right if z+1 is better, else done
            e_l = err(None, (z - 1).clamp(min=0))
            e_r = err(None, (z + 1).clamp(max=qmax))
            step = torch.where((z > 0) & (e_l <= e), -1.0, torch.where((z < qmax) & (e_r < e), 1.0, 0.0))
            z = torch.where(step < 0, z - 1, torch.where(step > 0, z + 1, z))
            e = torch.where(step < 0, e_l, torch.where(step > 0, e_r, e))
            active = torch.nonzero(step != 0).reshape(-1)
            while active.numel():
                st = step[active]
                nz = z[active] + st
                ok = (nz >= 0) & (nz <= qmax)
                active, st, nz = active[ok], st[ok], nz[ok]
                if not active.numel():
                    break
                en = err(active, nz)
                move = torch.where(st < 0, en <= e[active], en < e[active])
                active, nz, en = active[move], nz[move], en[move]
                z[active], e[active] = nz, en
            idx = i.long() - 1
            all_e[idx], all_z[idx], all_d[idx] = e.reshape(len(i), c), z.reshape(len(i), c), delta
            seen.append((float(i[0]), all_z[idx[0]] * all_d[idx[0]]))  # the narrowest range of this chunk
        k = all_e.argmin(0)  # the first (narrowest) range of equal errors
        ch = torch.arange(c, device=values.device)
        e_best, zb, db = all_e[k, ch], all_z[k, ch], all_d[k, ch]
        found = e_best < float("inf")
        return torch.where(found, -zb * db, lo0), torch.where(found, (qmax - zb) * db, hi0)


class AvgMSEObserver(MSEObserver):
    """MSE range per batch, averaged over batches (the paper's ``AvgMSEObserver``)."""

    update = AvgMinMaxObserver.update


class MSEFastObserver(MSEObserver):
    """The paper's ``MSEFastObserver`` (per tensor): bounded scalar minimisation (scipy's ``minimize_scalar``,
    method 'bounded', as the paper) of the Lp error. Two-sided asymmetric data: the range r over
    [min(0.1, 0.01 (max - min)), max - min], each r scored by an inner minimisation over the shift s in [0, r] of the
    grid [-s, r - s]; the result is clipped to the data's [min, max]. One-sided data or a symmetric grid: the
    threshold over [min(0.1, 0.01 t), t], t = max(|min|, max). Errors come from a 2048-bin histogram of the batch
    (one pass over the data, then each evaluation costs 2048 bins)."""

    def batch_range(self, x, lo, hi):
        from scipy.optimize import minimize_scalar  # noqa: PLC0415 - scipy only where this observer is used

        if self.ch_axis != -1:
            raise ValueError(f"{type(self).__name__} is per tensor (ch_axis=-1), got ch_axis={self.ch_axis}")
        xc = channel_view(x, -1)
        n = xc.shape[1]
        values, weights = self.histogram(xc, lo, hi, 2048) if n > self.max_samples and not self.exact else (xc, None)
        # at most 2048 values or bins, scored several hundred times one scalar at a time: on the CPU (on a GPU each
        # score is a few kernel launches and a sync; 16 images' decoder calibration took 2 min instead of 10 s)
        values, weights = values.cpu(), weights.cpu() if weights is not None else None
        qmin, qmax = qrange(self.bit, self.symmetric)
        x_min, x_max = float(lo[0]), float(hi[0])
        if self.one_side is None:
            self.one_side = "pos" if x_min >= 0 else "neg" if x_max <= 0 else "no"

        def loss(a: float, b: float) -> float:
            scale, zp = qparams_from_range(torch.tensor([a]), torch.tensor([b]), self.bit, self.symmetric)
            scale, zp = scale.to(values), zp.to(values)
            e = (fake_quant_ref(values, scale[:, None], zp[:, None], qmin, qmax) - values).abs().pow(self.p)
            return float((e * weights).sum() / n if weights is not None else e.mean())

        if self.one_side != "no" or self.symmetric:
            t = max(abs(x_min), x_max)
            res = minimize_scalar(lambda r: loss(0.0 if self.one_side == "pos" else -r,
                                                 0.0 if self.one_side == "neg" else r),
                                  bounds=(min(0.1, 0.01 * t), t), method="bounded")
            r = float(res.x)
            return (torch.zeros_like(lo) if self.one_side == "pos" else -torch.full_like(lo, r),
                    torch.zeros_like(hi) if self.one_side == "neg" else torch.full_like(hi, r))

        def best_shift(r: float):
            d = r / float(qmax - qmin)
            return minimize_scalar(lambda s: loss(-s, r - s), bounds=(d * qmin, d * qmax), method="bounded")

        span = x_max - x_min
        r = float(minimize_scalar(lambda r: best_shift(r).fun, bounds=(min(0.1, 0.01 * span), span),
                                  method="bounded").x)
        s = float(best_shift(r).x)
        return torch.full_like(lo, max(-s, x_min)), torch.full_like(hi, min(r - s, x_max))


class AvgMSEFastObserver(MSEFastObserver):
    """:class:`MSEFastObserver` per batch, averaged over batches (the paper's observer of the BIG key quantizer)."""

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
    "MSEFastObserver": MSEFastObserver,
    "AvgMSEFastObserver": AvgMSEFastObserver,
}
