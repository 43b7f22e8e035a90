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


def bandwidth(values: torch.Tensor, rule: str = "scott") -> float:
    """KDE bandwidth of 1-D ``values``: ``'scott'`` = std (ddof 1) * n^(-1/5), what ``scipy.stats.gaussian_kde``
    uses by default (the paper's test); ``'silverman'`` = 1.06 * std * n^(-1/5) (an option)."""
    v = values.reshape(-1).double()
    factor = {"scott": 1.0, "silverman": 1.06}[rule]
    return float(factor * v.std() * v.numel() ** (-1 / 5)) or 1e-6


def kde(values: torch.Tensor, grid: torch.Tensor, bw: Optional[float] = None) -> torch.Tensor:
    """Gaussian kernel density of 1-D ``values`` evaluated on ``grid`` (Scott's bandwidth by default)."""
    v = values.reshape(-1).float()
    n = v.numel()
    h = bw if bw is not None else bandwidth(v)
    z = (grid[:, None] - v[None, :]) / h
    return torch.exp(-0.5 * z * z).sum(1) / (n * h * math.sqrt(2 * math.pi))


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
                   peak_height: float = 0.01, max_samples: int = 0, bw_rule: str = "scott") -> Dict:
    """The paper's test: KDE on ``global_num`` grid points, peaks ``peak_distance`` apart and at least
    ``peak_height`` x the total density; bimodal iff exactly two peaks. ``max_samples``: test a seeded random subset
    of that many values (0 = all, as the paper)."""
    v = values.reshape(1, -1).float()
    v = (subsample(v, max_samples) if max_samples else v)[0]
    grid = torch.linspace(float(v.min()), float(v.max()), global_num, device=v.device)
    dens = torch.cat([kde(v, g, bandwidth(v, bw_rule)) for g in grid.split(16)]).cpu()  # bounded memory
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


def big_sample(k_posts: List[torch.Tensor], mode: str = "first_prompt", max_samples: int = 1 << 16):
    """(values to test, values to take the signs from) out of one attention's recorded post-k_proj activations, one
    (prompts, tokens, channels) tensor per calibration image. ``'first_prompt'`` (the paper): the first prompt of the
    first image is tested, the signs come from all prompts of that image. ``'pooled'``: every image, a seeded random
    subset of ``max_samples`` values tested (rows drawn at random, not strided, so every token position can appear),
    the signs from all of them."""
    if not k_posts:
        raise ValueError("BIG: no post-k_proj activations recorded (no calibration image with a box?)")
    if mode == "first_prompt":
        first = k_posts[0] if k_posts[0].dim() >= 3 else k_posts[0][None]  # (tokens, channels): one prompt
        return first[0].reshape(-1, first.shape[-1]), first.reshape(-1, first.shape[-1])
    rows = torch.cat([k.reshape(-1, k.shape[-1]) for k in k_posts])
    return subsample(rows.reshape(1, -1), max_samples)[0], rows


def apply_big(attentions: List, k_posts: Dict[int, List[torch.Tensor]], global_num=128, peak_distance=32,
              peak_height=0.01, sample: str = "first_prompt", bw_rule: str = "scott") -> List[Dict]:
    """For each attention (a QuantDecoderAttention) test its recorded post-k_proj activations (one tensor per
    calibration image) and flip if bimodal."""
    report = []
    for att in attentions:
        test, sign_data = big_sample(k_posts[id(att)], sample)
        det = detect_bimodal(test, global_num, peak_distance, peak_height, bw_rule=bw_rule)
        entry = {"layer": att.role, "bimodal": det["bimodal"], "num_peaks": det["num_peaks"], "peaks": det["peaks"],
                 "tested_values": int(test.numel())}
        if det["bimodal"]:
            gamma = channel_signs(sign_data)
            fold_signs(att.q_proj, att.k_proj, gamma)
            entry["flipped_channels"] = int((gamma < 0).sum())
        else:
            entry["flipped_channels"] = 0
        report.append(entry)
    return report
