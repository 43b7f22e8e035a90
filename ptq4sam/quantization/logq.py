"""The log2 quantizers' formulas, written once: AGQ's softmax grid (used by the fake quantizer in training and at
evaluation, by the AGQ search and by the ONNX export) and the LSQ-form gradient that AGQ and HLUQ's log branch share.

AGQ (PTQ4SAM) with base 2^(1/tau) and scale s, for x in [0, 1]::

    k = clamp(round(-tau * log2(max(x, 1e-20) / s)), min=0)      (k = 0 for every x >= s: saturated at s)
    x_hat = s * 2^(-k / tau) if k < L else 0                      (L non-zero levels, then an exact zero)

``L`` (:func:`agq_nonzero_levels`): the paper's code keeps ``L = 2^b`` non-zero levels plus the zero, 2^b + 1 values,
one more than b bits hold (``agq_levels: paper``, the default, labelled so); ``agq_levels: exact`` keeps ``2^b - 1``
non-zero levels plus the zero, 2^b values, a b-bit code that an integer kernel or an export can store.

log2 is computed as ``ln(x) / ln 2`` and 2^y as ``exp(y ln 2)``: ONNX has Log and Exp but no Log2 / Exp2, so the
exported graph computes the same float operations as the torch model.

Gradient: with a straight-through estimate of the rounding inside the log domain, the scale's gradient cancels
exactly for every in-range value (d/ds of s * 2^(-k(s)/tau) with dk/ds = tau / (s ln 2) is 0), so a "learned" AGQ or
HLUQ scale would learn from saturated values only. :func:`lsq_form` gives the quantizer LSQ's gradients instead, as
if the whole quantizer q(x/s) had a straight-through derivative 1: in range dx_hat/dx = 1 and
dx_hat/ds = (x_hat - x) / s; saturated or flushed, dx_hat/dx = 0 and dx_hat/ds = x_hat / s. For a uniform grid this is
exactly LSQ's gradient (tested against the autograd formula).
"""
from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
EPS = 1e-20  # the softmax's floor before its log (the paper's clamp)
AGQ_LEVELS = ("paper", "exact")


def agq_nonzero_levels(bit: int, mode: str = "paper") -> int:
    """Number of non-zero AGQ levels at ``bit`` bits: 2^b (the paper's code: 2^b + 1 values with the zero) or
    2^b - 1 (``'exact'``: 2^b values, a b-bit code)."""
    if mode not in AGQ_LEVELS:
        raise ValueError(f"agq_levels must be one of {list(AGQ_LEVELS)}, got {mode!r}")
    return 2 ** bit if mode == "paper" else 2 ** bit - 1


def agq_code(log_x: torch.Tensor, log_s: torch.Tensor, tau: float) -> torch.Tensor:
    """k = clamp(round(-tau * (ln x - ln s) / ln 2), min=0) from ``log_x`` = ln(max(x, EPS))."""
    return torch.round((log_x - log_s) * (-tau / LN2)).clamp(min=0)


def agq_value(code: torch.Tensor, scale: torch.Tensor, tau: float, levels: int) -> torch.Tensor:
    """x_hat = s * 2^(-k / tau), or 0 where k >= levels."""
    return (scale * torch.exp(code * (-LN2 / tau))).masked_fill(code >= levels, 0.0)


def agq_reference(x: torch.Tensor, scale: torch.Tensor, tau: float, levels: int) -> torch.Tensor:
    """The AGQ grid (module docstring), out of place, with exportable operators only (no autograd meaning)."""
    return agq_value(agq_code(torch.log(torch.clamp(x, min=EPS)), torch.log(scale), tau), scale, tau, levels)


@torch.no_grad()
def agq_from_log_(log_x: torch.Tensor, scale: torch.Tensor, tau: float, levels: int,
                  out: torch.Tensor) -> torch.Tensor:
    """:func:`agq_reference` from a precomputed ``log_x`` = ln(max(x, EPS)), computed in ``out`` (may be ``log_x``):
    the same float operations in the same order, so the same bits, with one work buffer (a softmax map is an
    attention's largest tensor; the AGQ search evaluates many candidates on one log map)."""
    t = torch.sub(log_x, torch.log(scale), out=out).mul_(-tau / LN2).round_().clamp_(min=0)
    drop = t >= levels
    return t.mul_(-LN2 / tau).exp_().mul_(scale).masked_fill_(drop, 0.0)


@torch.no_grad()
def agq_quantize_(x: torch.Tensor, scale: torch.Tensor, tau: float, levels: int) -> torch.Tensor:
    """:func:`agq_reference` for evaluation, in one new buffer (bit-identical)."""
    t = torch.clamp(x, min=EPS).log_()
    return agq_from_log_(t, scale, tau, levels, out=t)


def lsq_form(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``q`` (the quantized values of ``x`` with step / scale ``scale``) with LSQ's gradients (module docstring):
    d/dx = 1 where ``inside`` else 0; d/ds = (q - x) / s where ``inside`` else q / s. Values are ``q`` exactly."""
    out = q.detach()
    if x.requires_grad:
        out = out + (x - x.detach()) * inside
    if scale.requires_grad:
        s = scale.detach()
        g = torch.where(inside, (q.detach() - x.detach()) / s, q.detach() / s)
        out = out + (scale - s) * g
    return out


def agq_quantize(x: torch.Tensor, scale: torch.Tensor, tau: float, levels: int) -> torch.Tensor:
    """AGQ with LSQ-form gradients (x, and the scale when it requires a gradient); values = :func:`agq_reference`."""
    with torch.no_grad():
        q = agq_quantize_(x.detach(), scale.detach(), tau, levels)
        # in range: below s (not saturated) and not flushed to zero
        inside = (x.detach() < scale.detach()) & (q != 0)
    return lsq_form(q, x, scale, inside)
