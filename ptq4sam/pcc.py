"""Perceptual-Consistency Clipping (SAQ-SAM, Zhu et al.; code jingjing0419/SAQ-SAM): the clipping ranges of the mask
decoder's attention inputs chosen by how well the quantized attention keeps the float attention's focus, not by MSE.

For each decoder attention, in forward order, and each of its four per-tensor quantizers in turn (the inputs of
q_proj and k_proj, the projected Q and K), every quantile p of the grid gives a clip ``[quantile(x, 1 - p),
quantile(x, p)]`` of the signed values x that quantizer sees (an asymmetric uniform grid over it, zero included);
the p whose attention map keeps the float focus best wins (the first of equal scores: the narrowest clip):

    focus(A) = A > theta * max_k A               (per query row; strict)
    score    = mean over boxes and heads of 1 - |focus(A_q) & focus(A_fp)| / (|focus(A_q) | focus(A_fp)| + 1e-6)

(intersection and union counted over the whole queries x keys map). The search is greedy as the authors': every other
quantizer is off (float weights and activations) except the ones already chosen, which stay on; the reference maps
are the float model's. It runs on the first ``images`` calibration images with boxes (the authors: one image).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

# the authors' quantile grid
QUANTILES = (0.85, 0.87, 0.88, 0.89, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.960, 0.965, 0.970, 0.975, 0.980, 0.983,
             0.985, 0.987, 0.989, 0.99, 0.993, 0.995, 0.997, 0.999, 0.9993, 0.9995, 0.9997, 0.9999, 0.99999)
POINTS = ("q_in", "k_in", "q_post", "k_post")  # the order each attention's quantizers are searched in


def focus_mask(attn: torch.Tensor, theta: float) -> torch.Tensor:
    """Where an attention map (..., queries, keys) exceeds ``theta`` times its row's maximum."""
    return attn > theta * attn.amax(dim=-1, keepdim=True)


def focus_loss(attn_q: torch.Tensor, attn_fp: torch.Tensor, theta: float = 0.5) -> float:
    """1 - IoU of the two maps' focus masks, per map (all dims but the last two), averaged (module docstring)."""
    a, b = focus_mask(attn_q, theta), focus_mask(attn_fp, theta)
    inter = (a & b).sum(dim=(-2, -1)).double()
    union = (a | b).sum(dim=(-2, -1)).double()
    return float((1.0 - inter / (union + 1e-6)).mean())


def quantile_clips(xs: Sequence[torch.Tensor], quantiles: Sequence[float]):
    """(lower, upper) clip per quantile p: the (1 - p) and p quantiles of all values in ``xs`` (linear interpolation,
    numpy's default; torch.quantile refuses large tensors)."""
    flat = np.concatenate([x.detach().float().reshape(-1).cpu().numpy() for x in xs])
    ps = np.asarray(quantiles, dtype=np.float64)
    got = np.quantile(flat, np.concatenate([1.0 - ps, ps]))
    return [(float(lo), float(hi)) for lo, hi in zip(got[: len(ps)], got[len(ps):])]


@torch.no_grad()
def search_point(quantizer, xs: List[torch.Tensor], score: Callable[[], float], quantiles: Sequence[float],
                 set_clip: Callable[[object, float, float], None]) -> Dict:
    """Try each quantile's clip on ``quantizer`` (on, in the search), keep the best ``score()``; returns the report."""
    clips = quantile_clips(xs, quantiles)
    scores = []
    for lo, hi in clips:
        set_clip(quantizer, lo, hi)
        scores.append(score())
    best = min(range(len(clips)), key=lambda i: (scores[i], i))
    set_clip(quantizer, *clips[best])
    return {"quantile": float(quantiles[best]), "clip": [clips[best][0], clips[best][1]], "score": scores[best],
            "score_widest": scores[-1]}
