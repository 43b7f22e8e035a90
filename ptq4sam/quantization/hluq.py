"""HLUQ: AHCPTQ's Hybrid Log-Uniform Quantization for post-GELU activations (heavy-tailed and skewed).

With ``x' = x - m`` (m = calibrated minimum, so x' >= 0), a split point ``s_log`` and a uniform step ``s_uni``::

    x' <= s_log:  n = round(-log2(x' / s_log)); n >= L_log -> x' = 0, else x' = s_log * 2^-n  (n in 0..L_log-1)
    x' >  s_log:  u = clamp(round((x' - s_log) / s_uni), 0, L_uni - 1);  x' = s_log + u * s_uni

L_log = 2^b * grid_rate log codes (plus the zero) for the dense small values, L_uni = 2^b - L_log uniform codes for
the sparse large ones (u = 0 is the split point itself, shared with n = 0): 2^b distinct values in all. The
calibration follows AHCPTQ's ``HybridParamObserver``: range r = average max - average min over the calibration
batches, s_log = r * range_rate, s_uni = r * (1 - range_rate) / ((2^b - 1) * (1 - grid_rate)), and (range_rate,
grid_rate) from a grid that minimises the mean squared error of the *following linear layer's output* (its float
weight and bias), averaged over batches. Optionally (``top_rates``, this toolkit's extension; AHCPTQ: 1 only) the
range's top is clipped too, r -> r * top_rate, scored the same way. Unlike AHCPTQ's
``fake_hybrid_quantize_per_tensor_affine``, which zeroes uniform-region values x' >= L_log before quantizing them
(so they come out as s_log), every value above the split is quantized uniformly here.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cag import check_group_range, combined_group_ranges, group_channels
from .fake_quant import QUANTIZERS, FakeQuantizeBase, _bshape, round_ste
from .logq import lsq_form
from .observer import OBSERVERS, AvgMinMaxObserver, ObserverBase, data_range


def hluq_levels(bit: int, grid_rate: float) -> Tuple[int, int]:
    """(L_log, L_uni) for ``bit`` bits; ValueError when grid_rate does not split 2^bit into whole counts >= 1 / 2."""
    levels = 2 ** bit
    l_log = levels * grid_rate
    if abs(l_log - round(l_log)) > 1e-9 or round(l_log) < 1 or levels - round(l_log) < 2:
        raise ValueError(f"HLUQ: grid_rate {grid_rate} does not split {levels} levels ({bit} bits) into >= 1 log "
                         "and >= 2 uniform levels")
    return int(round(l_log)), levels - int(round(l_log))


def hluq_quantize(x: torch.Tensor, fp_min, scale_log, scale_uni, levels_log: int, levels_uni: int) -> torch.Tensor:
    """The HLUQ grid (module docstring); broadcasting over the parameters. Gradients: the uniform branch LSQ's
    (straight-through rounding), the log branch LSQ's form too (:func:`ptq4sam.quantization.logq.lsq_form`: a
    straight-through rounding inside the log would make the split point's gradient exactly 0 for every value)."""
    xs = x - fp_min
    with torch.no_grad():
        n = torch.round(-torch.log2(torch.clamp(xs / scale_log, min=1e-30)))
        log_q = scale_log * torch.exp2(-torch.clamp(n, min=0.0, max=levels_log - 1))
        flushed = n >= levels_log
        log_q = torch.where(flushed, torch.zeros_like(log_q), log_q)
    s_log = scale_log if torch.is_tensor(scale_log) else torch.as_tensor(scale_log, dtype=xs.dtype, device=xs.device)
    log_val = lsq_form(log_q, xs, s_log, ~flushed) if torch.is_grad_enabled() else log_q
    u = torch.clamp(round_ste((xs - scale_log) / scale_uni), 0.0, levels_uni - 1)
    uni_val = scale_log + u * scale_uni
    return torch.where(xs <= scale_log, log_val, uni_val) + fp_min


def hluq_level_set(fp_min: float, scale_log: float, scale_uni: float, levels_log: int, levels_uni: int) -> List[float]:
    """Every value the grid can produce, ascending (2^b of them)."""
    vals = {0.0} | {scale_log * 2.0 ** -n for n in range(levels_log)} | {scale_log + u * scale_uni
                                                                           for u in range(levels_uni)}
    return sorted(v + fp_min for v in vals)


def per_channel(values: torch.Tensor, group: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-group ``values`` spread to ``group``'s channels, shaped to broadcast along ``axis`` of ``x``."""
    return values.reshape(-1)[group].reshape(_bshape(x, axis % x.dim()))


def spatial_crops(x: torch.Tensor, max_pixels: int, size: int = 32) -> torch.Tensor:
    """``x`` (N, C, H, W) itself when it has at most ``max_pixels`` pixels, else k = max_pixels // size^2 crops of
    size x size at random places (seeded by the shape: the same crops for the same shape), stacked on the batch axis.
    Scoring HLUQ candidates on them costs k size^2 / (N H W) of the whole map (a 64 x 64 crop budget on TinyViT's
    256 x 256 stage-0 maps: 1/16)."""
    n, _, h, w = x.shape
    if n * h * w <= max_pixels:
        return x
    s = min(size, h, w)
    k = max(1, max_pixels // (s * s))
    gen = torch.Generator().manual_seed(n * h * w)
    b, i, j = (torch.randint(m, (k,), generator=gen) for m in (n, h - s + 1, w - s + 1))
    return torch.stack([x[bb, :, ii:ii + s, jj:jj + s] for bb, ii, jj in zip(b.tolist(), i.tolist(), j.tolist())])


class HybridRangeObserver(ObserverBase):
    """AHCPTQ's ``HybridParamObserver``: average min / max over batches, and per batch the output error of every
    (range_rate, grid_rate) candidate through the following linear layer (``set_layer``; without one, the error of
    the activation itself). Candidates whose grid_rate does not split 2^bit into whole level counts are skipped.
    With ``groups`` > 1, ``group_range`` says how a group's range is made from its channels' (``"channel"`` or
    ``"batch"``: :mod:`ptq4sam.quantization.cag`).
    Rows (tokens) are subsampled to ``max_rows`` per batch for the candidate errors (deterministically); a
    convolution's input is scored on square crops of ``max_rows`` pixels in all (:func:`spatial_crops`)."""

    def __init__(self, bit=8, symmetric=False, ch_axis=-1, range_rates: Sequence[float] = (0.1, 0.3, 0.5),
                 grid_rates: Sequence[float] = (1 / 8, 1 / 4, 1 / 2), max_rows: int = 4096,
                 top_rates: Sequence[float] = (1.0,), groups: int = 1, group_range: str = "channel"):
        super().__init__(bit, False, ch_axis)
        if groups < 1:
            raise ValueError(f"HLUQ: groups must be >= 1, got {groups}")
        self.groups = groups
        self.group_range = check_group_range(group_range)  # how a group's range is made (ptq4sam.quantization.cag)
        self.keep_batches = groups > 1 and group_range == "batch"
        self.candidates = []  # (range_rate, grid_rate, top_rate)
        for tr in top_rates:
            for rr in range_rates:
                for gr in grid_rates:
                    try:
                        hluq_levels(bit, gr)
                    except ValueError:
                        continue
                    self.candidates.append((float(rr), float(gr), float(tr)))
        if not self.candidates:
            raise ValueError(f"HLUQ: no grid_rate of {list(grid_rates)} fits {bit} bits")
        self.register_buffer("loss_sum", torch.zeros(len(self.candidates)))
        self.max_rows = max_rows
        self.__dict__["_layer"] = None

    def set_layer(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  fn: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]] = None
                  ) -> None:
        """(weight, bias) of the layer this activation enters, set by that layer before each observation; ``fn(x,
        weight, bias)`` is the layer's operation (None: a linear layer, scored on a subsample of its rows; else, e.g.
        a convolution, scored on the whole input)."""
        self.__dict__["_layer"] = (weight.detach(), None if bias is None else bias.detach(), fn)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        xd = x.detach().float()
        if self.groups > 1 and self.ch_axis == -1:
            self.ch_axis = xd.dim() - 1  # a Linear's input: channels last
        lo, hi = data_range(xd, -1 if self.groups == 1 else self.ch_axis)
        self.keep_batch(lo, hi)
        self.update(lo, hi)
        layer = self.__dict__["_layer"]
        op = None if layer is None else (layer[2] or F.linear)
        rows, rowwise = xd, layer is None or layer[2] is None
        if rowwise:  # row-wise layer: a subsample of rows scores as well as all of them
            rows = xd.reshape(-1, xd.shape[-1])
            if rows.shape[0] > self.max_rows:
                gen = torch.Generator().manual_seed(rows.shape[0])
                rows = rows.index_select(0, torch.randperm(rows.shape[0], generator=gen)[: self.max_rows]
                                         .to(rows.device))
        elif xd.dim() == 4:  # a convolution: square crops (of max_rows pixels in all) at seeded random places
            rows = spatial_crops(xd, self.max_rows)
        ref = op(rows, layer[0], layer[1]) if op is not None else rows
        losses = []
        axis = -1 if rowwise else self.ch_axis
        group = self.channel_groups()
        ranges = self._group_range(group)  # grouped once per batch, shared by every candidate
        for cand in self.candidates:  # the paper scores each candidate with this batch's running range
            fp_min, s_log, s_uni, l_log, l_uni = self.params_for(*cand, ranges=ranges)
            if group is not None:
                fp_min, s_log, s_uni = (per_channel(t, group, rows, axis) for t in (fp_min, s_log, s_uni))
            xq = hluq_quantize(rows, fp_min, s_log, s_uni, l_log, l_uni)
            out = op(xq, layer[0], layer[1]) if op is not None else xq
            losses.append((out - ref).pow(2).mean())
        self.loss_sum = self.loss_sum.to(xd.device) + torch.stack(losses)
        self.num_batches += 1
        return x

    def channel_groups(self) -> Optional[torch.Tensor]:
        """Group of each channel (CAG's progressive grouping of the running per-channel ranges), None per tensor."""
        if self.groups == 1:
            return None
        return group_channels(self.min_val, self.max_val, self.groups).to(self.min_val.device)

    update = AvgMinMaxObserver.update  # min / max averaged over batches (AHCPTQ)

    def _group_range(self, group: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if group is None:
            return self.min_val.reshape(()), self.max_val.reshape(())
        return combined_group_ranges(self, group, self.group_range)

    def params_for(self, range_rate: float, grid_rate: float, top_rate: float = 1.0, ranges=None):
        """fp_min, s_log, s_uni, L_log, L_uni of a candidate (scalars, or one per group with ``groups`` > 1: a
        group's range is the union of its members'); ``top_rate`` < 1 clips the range's top (the grid then spans
        (max - min) * top_rate: this toolkit's extension, AHCPTQ uses the whole range). ``ranges``: the groups'
        (min, max) when the caller has them (else grouped here)."""
        lo, hi = ranges if ranges is not None else self._group_range(self.channel_groups())
        r = (hi - lo).clamp(min=1e-8) * top_rate
        l_log, l_uni = hluq_levels(self.bit, grid_rate)
        s_log = r * range_rate
        s_uni = r * (1 - range_rate) / ((2 ** self.bit - 1) * (1 - grid_rate))
        return lo, s_log, s_uni, l_log, l_uni

    def best(self) -> Tuple[float, float, float]:
        if self.num_batches == 0:
            raise RuntimeError("HybridRangeObserver saw no data: run calibration first")
        return self.candidates[int(torch.argmin(self.loss_sum))]


class HLUQFakeQuantize(FakeQuantizeBase):
    """Hybrid log-uniform fake quantizer (see the module docstring); ``scale`` is the uniform step s_uni, with
    ``scale_log`` (the split point) learnable beside it and ``fp_min`` fixed. Per tensor only."""

    learnable = True
    uniform = False

    def __init__(self, observer, bit=8, symmetric=False, ch_axis=-1):
        super().__init__(observer, bit, False, -1)
        self.ch_axis = self.observer.ch_axis = ch_axis  # channel axis of group-wise parameters (unused per tensor)
        self.register_buffer("fp_min", torch.zeros(1))
        self.register_buffer("group", torch.zeros(0, dtype=torch.long))  # channel -> group (empty: per tensor)
        self.scale_log = nn.Parameter(torch.ones(1), requires_grad=False)
        self.grid_rate = 0.5
        self.levels_log, self.levels_uni = 2 ** bit // 2, 2 ** bit - 2 ** bit // 2

    def extra_repr(self):
        return super().extra_repr() + f", grid_rate={self.grid_rate}"

    def set_qparams(self, scale, zero_point):
        self.scale = nn.Parameter(scale.detach().clone().reshape(-1).float(), requires_grad=False)
        self.zero_point = torch.zeros(1, device=self.scale.device)

    @torch.no_grad()
    def init_from_observer(self) -> None:
        obs: HybridRangeObserver = self.observer
        cand = obs.best()
        group = obs.channel_groups()
        fp_min, s_log, s_uni, l_log, l_uni = obs.params_for(*cand, ranges=obs._group_range(group))
        obs.batches = []
        self.ch_axis = obs.ch_axis if group is not None else -1
        self.group = group if group is not None else torch.zeros(0, dtype=torch.long, device=self.fp_min.device)
        self.set_hybrid(fp_min, s_log, s_uni, cand[1])
        self.initialized = True

    def set_hybrid(self, fp_min, scale_log, scale_uni, grid_rate: float) -> None:
        self.grid_rate = float(grid_rate)
        self.levels_log, self.levels_uni = hluq_levels(self.bit, self.grid_rate)
        dev = self.fp_min.device
        self.fp_min = torch.as_tensor(fp_min, dtype=torch.float32, device=dev).reshape(-1).clone()
        self.scale_log = nn.Parameter(torch.as_tensor(scale_log, dtype=torch.float32, device=dev).reshape(-1).clone(),
                                      requires_grad=False)
        self.set_qparams(torch.as_tensor(scale_uni, dtype=torch.float32, device=dev), torch.zeros(1))

    def learnable_params(self) -> List[nn.Parameter]:
        return [self.scale, self.scale_log]

    def learns_qparams(self) -> bool:
        return torch.is_grad_enabled() and (self.scale.requires_grad or self.scale_log.requires_grad)

    def _eval_params(self):
        return (self.fp_min.detach(), self.scale_log.detach().abs().clamp(min=1e-8),
                self.scale.detach().abs().clamp(min=1e-8))

    def quantize(self, x):
        if self.learns_qparams():
            fp_min, s_log, s_uni = self.fp_min, self.scale_log.abs().clamp(min=1e-8), self.scale.abs().clamp(min=1e-8)
        else:
            fp_min, s_log, s_uni = self._no_grad_params(x)
        if self.group.numel():
            fp_min, s_log, s_uni = (per_channel(t, self.group, x, self.ch_axis % x.dim()) for t in (fp_min, s_log, s_uni))
        return hluq_quantize(x, fp_min, s_log, s_uni, self.levels_log, self.levels_uni)


QUANTIZERS["HLUQFakeQuantize"] = HLUQFakeQuantize
OBSERVERS["HybridRangeObserver"] = HybridRangeObserver
