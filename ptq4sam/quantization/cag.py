"""CAG: channel-aware grouping of the activations entering linear projections (after AHCPTQ).

The input channels (last axis) of a Linear are observed per channel, then clustered into G groups by their calibrated
ranges; each group shares one scale / zero point covering its members' ranges, so an integer kernel needs one
rescale per group (G partial sums) instead of one per channel. G = 1 is per-tensor quantization, G = number of
channels is per-channel.

Grouping (``group_channels``) is progressive: starting from one group, the group whose shared range costs most
(members x its range^2, the quantization noise it adds) is split in two by 2-means on the members' (min, max), until
there are G groups. AHCPTQ clusters (scale, zero point) with k-means and uses the cluster centres (members may be
clipped); here a group's range is the union of its members' ranges (no member is clipped).

Which ranges (``group_range``): ``"channel"`` unites the members' calibrated ranges, each already combined over the
calibration batches (averaged, for the Avg observers); ``"batch"`` unites the members' ranges within each batch and
combines those group ranges over the batches the same way (for the running MinMax / MSE observers the two are the
same). In both the channels are grouped by their calibrated ranges. They agree when every group holds one channel,
or when each channel's range is the same in every batch; for the Avg observers ``"batch"`` never narrows a range.
They differ where channels are sparse, e.g. SAM's decoder tokens: a channel that is large in one batch and near 0 in
the others gets a small average, so with ``"channel"`` the group's range can sit far below what the group holds in
any batch (values clipped), while ``"batch"`` keeps the group's per-batch maximum, as a per-tensor average range
does.
"""
from __future__ import annotations

import torch

from .fake_quant import QUANTIZERS, LSQFakeQuantize, _bshape, grad_scale
from .observer import qparams_from_range


def _two_means(pts: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Labels 0/1 of a 2-means split of ``pts`` (n, 2), started from the points of smallest and largest width."""
    width = pts[:, 1] - pts[:, 0]
    centers = torch.stack([pts[int(torch.argmin(width))], pts[int(torch.argmax(width))]])
    labels = torch.zeros(pts.shape[0], dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(pts, centers).argmin(1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        for k in range(2):
            if (labels == k).any():
                centers[k] = pts[labels == k].mean(0)
    return labels


def group_channels(lo: torch.Tensor, hi: torch.Tensor, groups: int) -> torch.Tensor:
    """Group index (0..G-1) of each channel, groups numbered by ascending range; see the module docstring."""
    c = lo.numel()
    if groups >= c:
        return torch.arange(c)
    lo, hi = lo.detach().float().cpu().reshape(-1), hi.detach().float().cpu().reshape(-1)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # quantization ranges always include 0
    pts = torch.stack([lo, hi], 1) / (hi.max() - lo.min()).clamp(min=1e-12)
    labels = torch.zeros(c, dtype=torch.long)
    for g in range(1, groups):
        cost = torch.full((g,), -1.0)
        for k in range(g):
            m = labels == k
            if m.sum() > 1:
                cost[k] = m.sum() * (hi[m].max() - lo[m].min()) ** 2
        k = int(torch.argmax(cost))
        if cost[k] < 0:  # every group holds one channel
            break
        idx = torch.nonzero(labels == k).flatten()
        split = _two_means(pts[idx])
        if split.all() or not split.any():  # identical ranges: split in half
            split = torch.arange(idx.numel()) >= idx.numel() // 2
        labels[idx[split.bool()]] = g
    n = int(labels.max()) + 1
    widths = torch.stack([hi[labels == k].max() - lo[labels == k].min() for k in range(n)])
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(widths)] = torch.arange(n)
    return rank[labels]


def group_ranges(lo: torch.Tensor, hi: torch.Tensor, group: torch.Tensor):
    """(min, max) of each group: the union of its members' ranges."""
    n = int(group.max()) + 1
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    glo = torch.full((n,), float("inf"), device=lo.device).scatter_reduce(0, group, lo, "amin")
    ghi = torch.full((n,), float("-inf"), device=lo.device).scatter_reduce(0, group, hi, "amax")
    return glo, ghi


GROUP_RANGES = ("channel", "batch")


def check_group_range(mode: str) -> str:
    if mode not in GROUP_RANGES:
        raise ValueError(f"group_range: expected one of {list(GROUP_RANGES)}, got {mode!r}")
    return mode


def combined_group_ranges(observer, group: torch.Tensor, mode: str):
    """Each group's (min, max) from a per-channel ``observer`` (module docstring, ``group_range``): ``"channel"``
    unites its calibrated per-channel ranges; ``"batch"`` unites each kept batch's per-channel ranges
    (``observer.batches``) and combines the group ranges over the batches by the observer's own rule."""
    if check_group_range(mode) == "channel":
        return group_ranges(observer.min_val, observer.max_val, group)
    if not observer.batches:
        raise RuntimeError(f"group_range 'batch': {type(observer).__name__} holds no batch ranges (keep_batches was "
                           "off during calibration, or init_from_observer already used and released them)")
    return observer.combine([group_ranges(lo, hi, group) for lo, hi in observer.batches])


class CAGFakeQuantize(LSQFakeQuantize):
    """Group-wise LSQ quantizer over a channel axis: ``scale`` / ``zero_point`` hold one value per group, ``group``
    maps each channel to its group. ``ch_axis=-1`` (a Linear's input): the input's last axis, fixed at the first
    observation; a convolution's input gives ``ch_axis=1``."""

    def __init__(self, observer, bit=8, symmetric=False, ch_axis=-1, groups: int = 4, grad_scale_mode="paper",
                 group_range: str = "channel"):
        super().__init__(observer, bit, symmetric, -1, grad_scale_mode)
        self.ch_axis = self.observer.ch_axis = ch_axis
        if groups < 1:
            raise ValueError(f"CAG: groups must be >= 1, got {groups}")
        self.groups = groups
        self.group_range = check_group_range(group_range)
        self.observer.keep_batches = group_range == "batch"
        self.register_buffer("group", torch.zeros(0, dtype=torch.long))

    def extra_repr(self):
        return super().extra_repr() + f", groups={self.groups}, group_range={self.group_range}"

    def forward(self, x):
        if self.observer_enabled and self.ch_axis == -1:
            self.ch_axis = self.observer.ch_axis = x.dim() - 1
        return super().forward(x)

    @torch.no_grad()
    def init_from_observer(self) -> None:
        lo, hi = self.observer.min_val.reshape(-1), self.observer.max_val.reshape(-1)
        group = group_channels(lo, hi, self.groups).to(lo.device)
        glo, ghi = combined_group_ranges(self.observer, group, self.group_range)
        self.observer.batches = []
        scale, zp = qparams_from_range(glo, ghi, self.bit, self.symmetric)
        self.group = group
        self.set_qparams(scale, zp)
        self.initialized = True

    def grad_factor(self, x: torch.Tensor) -> float:
        n = x.numel() / max(1, self.scale.numel())  # elements per group scale
        return 1.0 / (n * self.quant_max) ** 0.5 if self.quant_max > 0 else 1.0

    def _params(self, x):
        scale = grad_scale(self.scale, self.grad_factor(x)).abs().clamp(min=1e-8)[self.group]
        shape = _bshape(x, self.ch_axis % x.dim())
        return scale.reshape(shape), self.zero_point[self.group].reshape(shape)

    def _eval_params(self):
        scale, zp = super()._eval_params()
        return scale[self.group], zp[self.group]


QUANTIZERS["CAGFakeQuantize"] = CAGFakeQuantize
