"""GPTQ (Frantar et al., ICLR 2023) for the quantized layers' weights: one-shot, second-order error compensation.

Each weight row is quantized column by column on the grid its weight quantizer already holds (scale and zero point
from the weight observer, per output channel or per tensor); the rounding error of a column is spread over the columns
not yet quantized through the inverse of the layer's input Hessian H = 2 X^T X / n (X = the layer's float inputs on
the calibration images; for a convolution the unfolded patches, per group), so the layer output error
||W X^T - Q X^T||^2, not the weight error, is what the rounding minimises. It replaces AdaRound where a reconstruction
of the paper's budget (20000 steps per unit) cannot be afforded: seconds for the whole model on a CPU.

The quantized weight becomes the tensor the layer's weight quantizer rounds (``set_quant_source``; its values lie on
the quantizer's grid, so round-to-nearest or a re-initialised AdaRound reproduces it exactly), while the float weight
stays: a forward with the quantizers off is still the float model's, so the reconstruction's targets and the AGQ
search compare against the float model, not a weight-quantized one. ``info`` records each layer's proxy loss
tr((W - Q) H (W - Q)^T) under GPTQ and under round-to-nearest on the same grid.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .quantization.fake_quant import AdaRoundFakeQuantize
from .quantization.qmodules import QuantConv2d, QuantLinear

# Hessian dampening, a fraction of its mean diagonal: GPTQ's 0.01 is for float inputs; with 4-bit activations 0.1
# measured better (docs/methods.md, "GPTQ weights"). The q_config's gptq.damp defaults to this too.
DEFAULT_DAMP = 0.1


def _grid(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(w / scale) + zp, qmin, qmax) - zp) * scale


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int, damp: float = DEFAULT_DAMP, act_order: bool = True, block: int = 128) -> torch.Tensor:
    """GPTQ of ``w`` (G, R, C): G independent groups of R rows (output channels) over C input columns, Hessians ``h``
    (G, C, C); ``scale`` / ``zero_point`` (G, R): each row's grid. Returns the quantized weight (on the grid), in
    float64. Columns of zero Hessian diagonal (inputs that were always 0) are quantized as they are (no compensation).
    ``act_order``: columns in order of decreasing Hessian diagonal (GPTQ's "act order"), undone at the end."""
    w = w.double().clone()
    h = h.double().clone()
    g, r, c = w.shape
    sc, zp = scale.double()[..., None], zero_point.double().round()[..., None]  # (G, R, 1)
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0  # (a view: writes into h)
    perm = torch.argsort(diag, dim=1, descending=True, stable=True) if act_order \
        else torch.arange(c, device=w.device).expand(g, c)
    w = torch.gather(w, 2, perm[:, None, :].expand(g, r, c))
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(g, c, c)), 2, perm[:, None, :].expand(g, c, c))
    h = h + damp * torch.diagonal(h, dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(c, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (G, C, C)
    q = torch.empty_like(w)
    for b0 in range(0, c, block):  # GPTQ's lazy batch updates: a block's columns first, the rest once per block
        b1 = min(b0 + block, c)
        errs = torch.empty_like(w[:, :, b0:b1])
        for i in range(b0, b1):
            col = w[:, :, i]
            qc = _grid(col, sc[..., 0], zp[..., 0], qmin, qmax)
            q[:, :, i] = qc
            err = (col - qc) / hinv[:, i, i][:, None]  # (G, R)
            w[:, :, i + 1:b1] -= err[:, :, None] * hinv[:, i, i + 1:b1][:, None, :]
            errs[:, :, i - b0] = err
        w[:, :, b1:] -= errs @ hinv[:, b0:b1, b1:]
    inv = torch.argsort(perm, dim=1)
    return torch.gather(q, 2, inv[:, None, :].expand(g, r, c))


class _HessianHook:
    """Accumulates 2 X^T X / n of a layer's input as its own input quantizer leaves it (float while the quantizers
    are off), per group: (G, C, C) in float64."""

    def __init__(self, m: nn.Module):
        self.m, self.h, self.n = m, None, 0

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        if isinstance(m, QuantLinear):
            return x.reshape(1, -1, x.shape[-1])
        cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, Cin * k * k, L)
        g = m.groups
        cols = cols.reshape(x.shape[0], g, -1, cols.shape[-1])  # (B, G, Cin / G * k * k, L)
        return cols.permute(1, 0, 3, 2).reshape(g, -1, cols.shape[2])  # (G, B * L, Cin / G * k * k)

    def __call__(self, module, args):
        x = self._patches(module.input_quant(args[0]).detach().float())  # identity while its quantizer is off
        n = x.shape[1]
        if n == 0:
            return
        hx = torch.einsum("gni,gnj->gij", x, x).double()
        self.h = hx if self.h is None else self.h + hx
        self.n += n

    def hessian(self) -> torch.Tensor:
        return 2.0 * self.h / self.n


def supported(m: nn.Module) -> bool:
    wq = getattr(m, "weight_quantizer", None)
    if wq is None or not wq.initialized or not (getattr(wq, "uniform", False) or isinstance(wq, AdaRoundFakeQuantize)):
        return False
    if isinstance(m, QuantConv2d):
        return m.padding_mode == "zeros" and isinstance(m.padding, tuple)
    return isinstance(m, QuantLinear)


def _rows_params(m: nn.Module, rows: int):
    wq = m.weight_quantizer
    scale, zp = wq.scale.detach().reshape(-1), wq.zero_point.detach().reshape(-1)
    if scale.numel() == 1:
        scale, zp = scale.expand(rows), zp.expand(rows)
    elif scale.numel() != rows or wq.ch_axis != 0:
        raise ValueError(f"GPTQ: weight quantizer of {type(m).__name__} has {scale.numel()} scales on axis "
                         f"{wq.ch_axis}; expected per-tensor or per output channel (axis 0, {rows})")
    return scale, zp


@torch.no_grad()
def apply_gptq(model: nn.Module, run_forwards: Callable[[], None], damp: float = DEFAULT_DAMP, act_order: bool = True,
               progress: Callable = lambda it, **kw: it) -> Dict:
    """GPTQ on every supported quantized layer of ``model``: ``run_forwards`` runs the model over the calibration data
    while hooks collect each layer's input Hessian (its input after its own input quantizer: float inputs when every
    quantizer is off, the activation-quantized model's when the activation quantizers are on); then each weight is
    quantized by GPTQ on its quantizer's grid, kept as the tensor the quantizer rounds (the float weight stays).
    Returns per-layer proxy losses (GPTQ and round-to-nearest)."""
    t0 = time.time()
    names = {m: n for n, m in model.named_modules()}
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    todo = [m for m in layers if supported(m)]
    hooks = {m: _HessianHook(m) for m in todo}
    handles = [m.register_forward_pre_hook(hk) for m, hk in hooks.items()]
    try:
        run_forwards()
    finally:
        for hd in handles:
            hd.remove()
    out: List[Dict] = []
    for m in progress(todo, desc="GPTQ: layers"):
        hk = hooks[m]
        if hk.n == 0:
            out.append({"layer": names[m], "skipped": "no calibration input reached it"})
            continue
        h = hk.hessian()
        g = h.shape[0]
        w = m.quant_source().detach()  # the float weight, or another method's (ACNR's) weight to quantize
        rows = w.shape[0]
        scale, zp = _rows_params(m, rows)
        wg = w.reshape(g, rows // g, -1)
        sg, zg = scale.reshape(g, rows // g), zp.reshape(g, rows // g)
        wq = m.weight_quantizer
        q = gptq_quantize(wg, h, sg, zg, wq.quant_min, wq.quant_max, damp, act_order)
        rtn = _grid(wg.double(), sg.double()[..., None], zg.double().round()[..., None], wq.quant_min, wq.quant_max)

        def proxy(a, h=h, wg=wg):
            d = wg.double() - a
            return float(torch.einsum("gri,gij,grj->", d, h, d))
        out.append({"layer": names[m], "proxy_gptq": proxy(q), "proxy_rtn": proxy(rtn)})
        m.set_quant_source(q.reshape(w.shape).to(w.dtype))  # the float weight stays
        if isinstance(wq, AdaRoundFakeQuantize) and wq.learnable:
            wq.init_alpha(m.quant_source())  # its soft rounding starts at the GPTQ weight (on the grid)
    done = [e for e in out if "proxy_gptq" in e]
    ratio = [e["proxy_gptq"] / e["proxy_rtn"] for e in done if e["proxy_rtn"] > 0]
    return {"layers": len(done), "skipped": [e for e in out if "skipped" in e],
            "not_supported": [names[m] for m in layers if m not in hooks],
            "proxy_ratio_median": float(torch.tensor(ratio).median()) if ratio else None,
            "per_layer": done, "time_s": round(time.time() - t0, 2)}
