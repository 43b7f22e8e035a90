"""LNQ, the log-transform quantizer of softmax outputs (AHCQ-SAM, Zhang et al.), written once: the fake quantizer
(training, evaluation), the search (:mod:`ptq4sam.lnq`) and the ONNX export use :func:`lnq_reference`.

For x in [0, 1] with scale s (the clipping point) and curvature alpha > 0::

    D = ln(1 + alpha * s)
    code = clamp(round(ln(1 + alpha * min(max(x, 0), s)) / D * L), 0, L)       L = 2^b - 1: codes 0..L, a b-bit code
    x_hat = (exp(code / L * D) - 1) / alpha                                       (code 0 -> exactly 0; code L -> s)

A small alpha makes the grid uniform on [0, s]; a large one puts the levels near zero, where softmax values crowd.

Levels: the paper describes 2^b levels. The authors' code searches with 2^b levels but evaluates with
``L = 2^b`` (codes 0..2^b, 2^b + 1 values, one more than b bits hold); we follow the paper (``L = 2^b - 1``) in
search, reconstruction, evaluation and export alike.

The code is computed with an exportable ln(1 + y) (ONNX has no Log1p), then looked up in the 2^b levels, computed
once in float64: an exported graph computes the same float operations and holds the same table as the torch model.

Gradients: straight-through for x inside [0, s) (d x_hat / dx = 1), 0 where x is clipped at s. Neither s nor alpha is
learned in a reconstruction (the authors' code keeps both fixed once searched).
"""
from __future__ import annotations

import torch

from .fake_quant import QUANTIZERS, FakeQuantizeBase
from .logq import lsq_form


def lnq_max_code(bit: int) -> int:
    """The largest LNQ code at ``bit`` bits (codes 0..2^b - 1)."""
    return 2 ** bit - 1


def lnq_levels(scale: torch.Tensor, alpha: float, max_code: int) -> torch.Tensor:
    """The 2^b LNQ levels (exp(k / L * ln(1 + alpha s)) - 1) / alpha, k = 0..L, computed in float64 (the float32 form
    loses digits to cancellation when alpha s is small) and returned in ``scale``'s dtype."""
    k = torch.arange(max_code + 1, dtype=torch.float64, device=scale.device)
    d = torch.log1p(alpha * scale.detach().double().reshape(()))
    return (torch.expm1(k * (d / max_code)) / alpha).to(scale.dtype)


def log1p_exportable(y: torch.Tensor) -> torch.Tensor:
    """ln(1 + y) to a few ulps for y >= 0 from Log / Add / Sub / Div / Where only (ONNX has no Log1p): with u = 1 + y,
    ln(u) * y / (u - 1) cancels the rounding of u (Goldberg, "What every computer scientist should know about
    floating-point arithmetic", thm. 4); y where u rounds to 1."""
    u = 1.0 + y
    return torch.where(u == 1.0, y, torch.log(u) * y / (u - 1.0))


def lnq_log(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """ln(1 + alpha max(x, 0)): the transformed values, independent of s (the search computes them once per alpha)."""
    return log1p_exportable(alpha * torch.clamp(x, min=0.0))


def lnq_from_log(log_x: torch.Tensor, scale: torch.Tensor, alpha: float, max_code: int) -> torch.Tensor:
    """The LNQ grid from ``log_x`` = :func:`lnq_log` (x): code = clamp(round(min(log_x, D) / D * L), 0, L) with
    D = ln(1 + alpha s) (= the transform of min(x, s): ln(1 + alpha y) is increasing), then its level (a table
    lookup: ONNX ``Gather``)."""
    d = log1p_exportable(alpha * scale)
    code = torch.clamp(torch.round(torch.minimum(log_x, d) / d * max_code), 0.0, float(max_code)).long()
    return lnq_levels(scale, alpha, max_code)[code]


def lnq_reference(x: torch.Tensor, scale: torch.Tensor, alpha: float, max_code: int) -> torch.Tensor:
    """The LNQ grid (module docstring)."""
    return lnq_from_log(lnq_log(x, alpha), scale, alpha, max_code)


def lnq_quantize(x: torch.Tensor, scale: torch.Tensor, alpha: float, max_code: int) -> torch.Tensor:
    """LNQ with a straight-through gradient for x in [0, s) (values: :func:`lnq_reference`)."""
    with torch.no_grad():
        q = lnq_reference(x.detach(), scale.detach(), alpha, max_code)
        inside = x.detach() < scale.detach()
    return lsq_form(q, x, scale.detach(), inside)


class LNQFakeQuantize(FakeQuantizeBase):
    """LNQ fake quantizer for post-softmax values (module docstring); ``lnq_alpha`` and ``scale`` are set by the LNQ
    search (:class:`ptq4sam.lnq.LNQSearch`), per tensor (one pair for all heads), and are not learned."""

    learnable = False
    uniform = False

    def __init__(self, observer, bit=8, symmetric=False, ch_axis=-1, alpha: float = 1.0):
        super().__init__(observer, bit, False, -1)
        if not alpha > 0:
            raise ValueError(f"LNQ alpha must be > 0, got {alpha}")
        self.lnq_alpha = float(alpha)  # (not ``alpha``: AdaRound's rounding parameter has that name)
        self.max_code = lnq_max_code(bit)

    def extra_repr(self):
        return super().extra_repr() + f", alpha={self.lnq_alpha}"

    def set_qparams(self, scale, zero_point):
        self.scale = scale.detach().clone().reshape(-1).float()[:1]
        self.zero_point = torch.zeros(1, device=self.scale.device)

    @torch.no_grad()
    def init_from_observer(self) -> None:
        if self.observer.num_batches == 0:
            raise RuntimeError("LNQFakeQuantize saw no data: run calibration first")
        self.set_qparams(self.observer.max_val.reshape(-1).amax().clamp(min=1e-8), torch.zeros(1))
        self.initialized = True

    def _eval_params(self):
        return self.scale.detach().clamp(min=1e-8), None

    def learnable_params(self):
        return []

    def quantize(self, x):
        scale = self._no_grad_params(x)[0]
        if not torch.is_grad_enabled():
            return lnq_reference(x, scale, self.lnq_alpha, self.max_code)
        return lnq_quantize(x, scale, self.lnq_alpha, self.max_code)


QUANTIZERS["LNQFakeQuantize"] = LNQFakeQuantize
