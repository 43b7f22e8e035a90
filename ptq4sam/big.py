"""BIG (Bimodal Integration): detect bimodal post-k_proj activations and fold a per-channel sign into k_proj/q_proj.

For an attention with keys K = x W_k^T + b_k and queries Q = y W_q^T + b_q, flipping the sign of channel c in both
(gamma_c = +-1) leaves every head's Q K^T unchanged (gamma_c^2 = 1), while each key channel's mean becomes
positive, so a bimodal per-tensor distribution (channels centred at +m and -m) becomes unimodal.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .quantization.observer import subsample


def kde(values: torch.Tensor, grid: torch.Tensor, bandwidth: Optional[float] = None) -> torch.Tensor:
    """Gaussian kernel density of 1-D ``values`` evaluated on ``grid`` (Scott's bandwidth by default)."""
    v = values.reshape(-1).float()
    n = v.numel()
    if bandwidth is None:
        bandwidth = float(1.06 * v.std() * n ** (-1 / 5)) or 1e-6
    z = (grid[:, None] - v[None, :]) / bandwidth
    return torch.exp(-0.5 * z * z).sum(1) / (n * bandwidth * math.sqrt(2 * math.pi))


def find_peaks(y: torch.Tensor, height: float = 0.0, distance: int = 1) -> torch.Tensor:
    """Indices of local maxima of ``y`` with y >= height, at least ``distance`` apart (taller peaks win),
    like ``scipy.signal.find_peaks(y, height=height, distance=distance)`` for plateau-free curves."""
    if y.numel() < 3:
        return torch.zeros(0, dtype=torch.long)
    mid = y[1:-1]
    is_peak = (mid > y[:-2]) & (mid >= y[2:]) & (mid >= height)
    idx = torch.nonzero(is_peak).reshape(-1) + 1
    if idx.numel() <= 1 or distance <= 1:
        return idx
    order = torch.argsort(y[idx], descending=True, stable=True)
    keep = torch.ones(idx.numel(), dtype=torch.bool)
    for i in order.tolist():  # at most a handful of peaks on a smooth KDE
        if keep[i]:
            close = (idx - idx[i]).abs() < distance
            close[i] = False
            keep &= ~close
    return idx[keep].sort().values


def detect_bimodal(values: torch.Tensor, global_num: int = 128, peak_distance: int = 32,
                   peak_height: float = 0.01, max_samples: int = 1 << 16) -> Dict:
    """The paper's test: KDE on ``global_num`` grid points, peaks ``peak_distance`` apart and at least
    ``peak_height`` x the total density; bimodal iff exactly two peaks."""
    v = subsample(values.reshape(1, -1).float(), max_samples)[0]
    grid = torch.linspace(float(v.min()), float(v.max()), global_num, device=v.device)
    dens = kde(v, grid).cpu()  # 1-D and tiny: the peak search runs on the host
    grid = grid.cpu()
    peaks = find_peaks(dens, height=peak_height * float(dens.sum()), distance=peak_distance)
    return {"bimodal": int(peaks.numel()) == 2, "num_peaks": int(peaks.numel()),
            "peaks": [round(float(grid[i]), 4) for i in peaks], "grid": grid, "density": dens}


def channel_signs(k_post: torch.Tensor) -> torch.Tensor:
    """gamma_c = sign(mean of channel c) over all tokens; a zero mean counts as +1."""
    mean = k_post.reshape(-1, k_post.shape[-1]).float().mean(0)
    return torch.where(mean < 0, -torch.ones_like(mean), torch.ones_like(mean))


@torch.no_grad()
def fold_signs(q_proj: torch.nn.Linear, k_proj: torch.nn.Linear, gamma: torch.Tensor) -> None:
    """Multiply output channel c of both projections (weight rows and bias) by gamma_c."""
    for lin in (q_proj, k_proj):
        g = gamma.to(lin.weight.dtype).to(lin.weight.device)
        lin.weight.mul_(g[:, None])
        if lin.bias is not None:
            lin.bias.mul_(g)


def apply_big(attentions: List, k_posts: Dict[int, List[torch.Tensor]], global_num=128, peak_distance=32,
              peak_height=0.01) -> List[Dict]:
    """For each attention (a QuantDecoderAttention) test its recorded post-k_proj activations and flip if bimodal."""
    report = []
    for att in attentions:
        ks = torch.cat([k.reshape(-1, k.shape[-1]) for k in k_posts[id(att)]])
        det = detect_bimodal(ks, global_num, peak_distance, peak_height)
        entry = {"layer": att.role, "bimodal": det["bimodal"], "num_peaks": det["num_peaks"], "peaks": det["peaks"]}
        if det["bimodal"]:
            gamma = channel_signs(ks)
            fold_signs(att.q_proj, att.k_proj, gamma)
            entry["flipped_channels"] = int((gamma < 0).sum())
        else:
            entry["flipped_channels"] = 0
        report.append(entry)
    return report
