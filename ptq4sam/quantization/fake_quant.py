"""Fake quantizers. Each owns an observer (statistics) and quantizes with the parameters it derives from it.

State flags on every quantizer (switched through ``ptq4sam.quantization.state``):
  observer_enabled: feed the observer; fake_quant_enabled: quantize; drop_prob: QDrop probability of using the
  quantized value per element (1.0 = always quantized, as at evaluation).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Type

import torch
from torch import nn

from ..errors import NonFiniteActivation
from .logq import agq_nonzero_levels, agq_quantize, agq_quantize_, agq_reference
from .observer import ObserverBase, memory_order, qrange


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return (x - x * g).detach() + x * g


def aten_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                       ch_axis: int = -1) -> torch.Tensor:
    """ATen's ``fake_quantize_per_tensor_affine`` (``ch_axis`` -1) or ``fake_quantize_per_channel_affine``."""
    if ch_axis == -1:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, ch_axis, qmin, qmax)


def _fast_path(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               ch_axis: int) -> bool:
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or scale.dtype != torch.float32
            or zero_point.dtype != torch.int32 or (x.requires_grad and torch.is_grad_enabled())):
        return False
    if ch_axis == -1:
        return scale.numel() == 1 and zero_point.numel() == 1 and abs(int(zero_point.reshape(()))) < 2 ** 24
    n = x.shape[ch_axis]
    return (scale.numel() == n and zero_point.numel() == n  # (ATen refuses zero points outside the grid)
            and int(zero_point.min()) >= qmin and int(zero_point.max()) <= qmax)


def fake_quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                         ch_axis: int = -1) -> torch.Tensor:
    """:func:`aten_fake_quantize`'s values, computed in six vectorised passes where it can: a float32 CPU tensor that
    needs no gradient, a float32 scale and an int32 zero point (ATen's own contract) of one value per tensor or one
    per channel, a zero point inside the grid (per channel; ATen refuses others) or below 2^24 (per tensor).
    ATen's CPU kernel is a scalar loop that also writes a gradient mask: 11.5-14.2 ns per element on a 2-core AMD
    EPYC VM (one thread, medians) against 1.1-1.4 ns here, and a W8A8 LiteMedSAM image encoder 1.9x faster (3.6 s
    -> 1.9 s)
    (``docs/results/cpu_speed/fake_quant.json``, ``tools/benchmark_fake_quant.py``).

    The formula is ATen's, in float32: ``q = clamp(round_half_even(x * (1 / s)) + z, qmin, qmax)``, then
    ``(q - z) * s``; the values are equal bit for bit wherever ``x / s`` is finite and below 2^63 in magnitude
    (tests/test_quant_core.py). Beyond: a NaN input stays NaN (ATen gives ``qmin``), and per channel an Inf or a
    quotient beyond 2^63 gives the clamped end of the grid (ATen's integer cast wraps it to ``qmin``). Everywhere
    else (another dtype or device, other parameter shapes, a gradient through ``x``, whose straight-through mask
    ATen's autograd provides) ATen's operator runs."""
    if not _fast_path(x, scale, zero_point, qmin, qmax, ch_axis):
        return aten_fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    s, z = scale.detach(), zero_point.detach().float()
    shape = () if ch_axis == -1 else _bshape(x, ch_axis)
    s, z = s.reshape(shape), z.reshape(shape)
    out = torch.mul(x, 1.0 / s)
    return out.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def _bshape(x: torch.Tensor, ch_axis: int):
    """Shape that broadcasts a per-channel vector along ``ch_axis`` of ``x``."""
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return shape


class FakeQuantizeBase(nn.Module):
    """Uniform affine fake quantization with parameters from the observer (no learning)."""

    learnable = False
    uniform = True  # quantize() is the uniform affine grid of (scale, zero_point) unless it learns them

    def __init__(self, observer: ObserverBase, bit: int = 8, symmetric: bool = False, ch_axis: int = -1):
        super().__init__()
        if not 2 <= bit <= 16:
            raise ValueError(f"bit must be in 2..16, got {bit}")
        self.observer = observer
        self.bit, self.symmetric, self.ch_axis = bit, symmetric, ch_axis
        self.quant_min, self.quant_max = qrange(bit, symmetric)
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0.0]))
        self.observer_enabled = False
        self.fake_quant_enabled = False
        self.drop_prob = 1.0
        self.initialized = False
        self.is_weight = False  # set by the quantized module that owns it
        self.is_layer_input = False
        self._frozen: Optional[tuple] = None  # evaluation constants, set by freeze(), cleared by every state switch

    def extra_repr(self):
        return (f"bit={self.bit}, symmetric={self.symmetric}, ch_axis={self.ch_axis}, "
                f"observe={self.observer_enabled}, quant={self.fake_quant_enabled}, drop_prob={self.drop_prob}")

    @torch.no_grad()
    def init_from_observer(self) -> None:
        scale, zp = self.observer.calculate_qparams()
        self.set_qparams(scale, zp)
        self.initialized = True

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = scale.detach().clone().reshape(-1).float()
        self.zero_point = zero_point.detach().clone().reshape(-1).float()

    def _params(self, x):
        if self.ch_axis == -1:
            return self.scale, self.zero_point
        shape = _bshape(x, self.ch_axis)
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def _eval_params(self):
        """(scale, integer zero point) as the no-grad path uses them."""
        return self.scale.detach(), self.zero_point.detach().round().to(torch.int32)

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the evaluation constants once (no per-call parameter preparation); any state switch undoes it."""
        self._frozen = self._eval_params() if self.initialized else None

    def unfreeze(self) -> None:
        self._frozen = None

    def _no_grad_params(self, x: torch.Tensor):
        f = self._frozen
        if f is not None and f[0].device == x.device:
            return f
        return self._eval_params()

    def learnable_params(self):
        """The scale-like parameters a reconstruction may learn (positive: learnable in log space too)."""
        return [self.scale] if isinstance(self.scale, nn.Parameter) else []

    def learnable_offsets(self):
        """The offset-like parameters a reconstruction may learn (any sign: learned in linear space)."""
        return []

    def learns_qparams(self) -> bool:
        """Whether a backward pass needs gradients for this quantizer's scale / zero point."""
        return torch.is_grad_enabled() and (self.scale.requires_grad or self.zero_point.requires_grad)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learns_qparams():
            # one fused kernel, at evaluation and in a reconstruction that keeps this quantizer's parameters fixed:
            # its gradient w.r.t. x is the straight-through estimator of the formula below (1 inside the clamp
            # range, 0 outside), so only the parameters' gradients need the autograd formula
            scale, zp = self._no_grad_params(x)
            ch = -1 if self.ch_axis == -1 else self.ch_axis % x.dim()
            return fake_quantize_affine(x, scale, zp, self.quant_min, self.quant_max, ch)
        scale, zp = self._params(x)
        return (torch.clamp(round_ste(x / scale) + zp, self.quant_min, self.quant_max) - zp) * scale

    def check_finite(self, x: torch.Tensor, what: str = "activations") -> None:
        """Calibration on NaN / Inf would give NaN ranges and a silently broken model: name the quantizer instead."""
        if x.numel() == 0:
            return
        # min and max are finite iff every element is (both propagate NaN): one reduction, ~10x cheaper than
        # isfinite(x).all(), which writes a boolean copy of x
        lo, hi = torch.aminmax(x.detach())
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            bad = x[~torch.isfinite(x)]
            raise NonFiniteActivation(
                f"calibration: {int(bad.numel())} of {x.numel()} {what} reaching quantizer "
                f"'{getattr(self, 'qname', type(self).__name__)}' are NaN/Inf (e.g. {float(bad.flatten()[0])}); "
                "check the input images and the model's weights (a float model that gives NaN cannot be quantized)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.check_finite(x)
            self.observer(x)
        if not self.fake_quant_enabled:
            return x
        if not self.initialized:
            raise RuntimeError(f"{type(self).__name__} is enabled but was never calibrated")
        if self.drop_prob >= 1.0:
            return self.quantize(x)
        # QDrop: keep the float value for a random subset of elements
        use_q = qdrop_mask(x.shape, self.drop_prob, device=x.device, like=x)
        if self.uniform and x.requires_grad and not self.learns_qparams():
            scale, zp = self._no_grad_params(x)
            ch = -1 if self.ch_axis == -1 else self.ch_axis % x.dim()
            return _QDropFakeQuant.apply(x, use_q, scale, zp, self.quant_min, self.quant_max, ch)
        return torch.where(use_q, self.quantize(x), x)


_BIT_SHIFTS: Dict[torch.device, torch.Tensor] = {}


def qdrop_mask(shape, p: float, generator: Optional[torch.Generator] = None, device=None,
               like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool mask, True with probability ``p`` per element (QDrop: use the quantized value there).

    For QDrop's usual p = 0.5 each random byte gives 8 mask bits (5x faster than ``rand < p`` on a CPU; the large
    activations of reconstruction made the random numbers a tenth of a step); other p compare uniform numbers.
    ``like``: lay the mask out in that tensor's memory order (e.g. channels-last), so mixing needs no copy."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    order = list(range(len(shape)))
    if like is not None and not like.is_contiguous() and len(shape) > 1:
        order = memory_order(like)
    drawn = tuple(shape[d] for d in order)
    if p != 0.5:
        m = torch.rand(drawn, generator=generator, device=device) < p
    else:
        n = math.prod(shape)
        shifts = _BIT_SHIFTS.get(device)
        if shifts is None:
            shifts = _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
        b = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=generator, device=device)
        m = ((b[:, None] >> shifts) & 1).view(torch.bool).reshape(-1)[:n].reshape(drawn)
    return m.permute([order.index(d) for d in range(len(shape))]) if order != sorted(order) else m


class _QDropFakeQuant(torch.autograd.Function):
    """``where(use_q, fake_quant(x), x)`` for fixed (scale, zero point), with the straight-through gradient of the
    formula (1, except 0 where a quantized element was clamped) kept as one saved bool mask: the autograd formula
    needs three ``where`` passes and a sum over the largest activations in its backward."""

    @staticmethod
    def forward(ctx, x, use_q, scale, zero_point, qmin: int, qmax: int, ch_axis: int):
        if ch_axis == -1:
            xq, inside = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
                x, scale, zero_point, torch.ones(1, dtype=torch.long, device=x.device), qmin, qmax)  # CUDA: int64 flag
        else:
            xq, inside = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
                x, scale, zero_point, ch_axis, qmin, qmax)
        ctx.save_for_backward(use_q & ~inside)
        return torch.where(use_q, xq, x)

    @staticmethod
    def backward(ctx, grad):
        (clamped,) = ctx.saved_tensors
        return grad.masked_fill(clamped, 0.0), None, None, None, None, None, None


class FixedFakeQuantize(FakeQuantizeBase):
    """Fixed-range uniform quantizer (round to nearest, parameters from the observer)."""


class LSQFakeQuantize(FakeQuantizeBase):
    """LSQ: learnable scale with the gradient scaled by g = 1/sqrt(N * qmax), N = elements per scale (numel / C per
    channel, as the paper's code; ``grad_scale_mode='numel'``, an option: numel for every channel), fixed zero
    point."""

    learnable = True

    def __init__(self, observer, bit=8, symmetric=False, ch_axis=-1, grad_scale_mode: str = "paper"):
        super().__init__(observer, bit, symmetric, ch_axis)
        if grad_scale_mode not in ("paper", "numel"):
            raise ValueError(f"grad_scale_mode must be 'paper' or 'numel', got {grad_scale_mode!r}")
        self.grad_scale_mode = grad_scale_mode

    def set_qparams(self, scale, zero_point):
        self.scale = nn.Parameter(scale.detach().clone().reshape(-1).float())
        self.zero_point = zero_point.detach().clone().reshape(-1).float()

    def grad_factor(self, x: torch.Tensor) -> float:
        n = x.numel()
        if self.ch_axis != -1 and self.grad_scale_mode == "paper":
            n = n / x.shape[self.ch_axis]
        return 1.0 / (n * self.quant_max) ** 0.5 if self.quant_max > 0 else 1.0

    def _params(self, x):
        scale = grad_scale(self.scale, self.grad_factor(x)).abs().clamp(min=1e-8)
        if self.ch_axis == -1:
            return scale, self.zero_point
        shape = _bshape(x, self.ch_axis)
        return scale.reshape(shape), self.zero_point.reshape(shape)

    def _eval_params(self):
        return self.scale.detach().abs().clamp(min=1e-8), self.zero_point.detach().round().to(torch.int32)


class LSQPlusFakeQuantize(LSQFakeQuantize):
    """LSQ+: learnable scale and zero point (rounded with STE, gradient scaled like the scale's, as the paper's
    code), clamped to [qmin, qmax] in training and at evaluation alike."""

    def set_qparams(self, scale, zero_point):
        self.scale = nn.Parameter(scale.detach().clone().reshape(-1).float())
        self.zero_point = nn.Parameter(zero_point.detach().clone().reshape(-1).float())

    def learnable_offsets(self):
        return [] if self.symmetric else [self.zero_point]  # a symmetric grid's zero point stays 0

    def _params(self, x):
        scale, _ = super()._params(x)
        zp = torch.clamp(round_ste(grad_scale(self.zero_point, self.grad_factor(x))), self.quant_min, self.quant_max)
        if self.ch_axis != -1:
            zp = zp.reshape(_bshape(x, self.ch_axis))
        return scale, zp

    def _eval_params(self):
        zp = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).to(torch.int32)
        return self.scale.detach().abs().clamp(min=1e-8), zp


class AdaRoundFakeQuantize(FakeQuantizeBase):
    """AdaRound for weights: w_q = s * (clamp(floor(w/s) + h(alpha) + zp) - zp), h learnable in [0, 1].

    ``round_mode='learned_hard_sigmoid'``: h = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1) (soft);
    after :meth:`harden` h = (alpha >= 0), so every weight is either floor or floor + 1.
    ``round_mode='nearest'`` never learns: plain round-to-nearest.
    """

    zeta, gamma = 1.1, -0.1
    uniform = False

    def __init__(self, observer, bit=8, symmetric=False, ch_axis=0, round_mode: str = "learned_hard_sigmoid"):
        super().__init__(observer, bit, symmetric, ch_axis)
        if round_mode not in ("learned_hard_sigmoid", "nearest"):
            raise ValueError(f"round_mode must be 'learned_hard_sigmoid' or 'nearest', got {round_mode!r}")
        self.round_mode = round_mode
        self.alpha: Optional[nn.Parameter] = None
        self.hard = False

    @property
    def learnable(self):
        return self.round_mode != "nearest"

    def init_alpha(self, w: torch.Tensor) -> None:
        scale, _ = self._params(w)
        rest = (w / scale) - torch.floor(w / scale)  # in [0, 1)
        alpha = -torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1)  # h(alpha) == rest
        self.alpha = nn.Parameter(alpha.detach())
        self.hard = False

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)

    def rounding_loss(self, b: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(b)).sum()

    @torch.no_grad()
    def harden(self) -> None:
        self.hard = True

    def quantize(self, x):
        if self.round_mode == "nearest" or self.alpha is None:
            return super().quantize(x)
        scale, zp = self._params(x)
        x_floor = torch.floor(x / scale)
        delta = (self.alpha >= 0).to(x.dtype) if self.hard else self.h()
        return (torch.clamp(x_floor + delta + zp, self.quant_min, self.quant_max) - zp) * scale


class AGQFakeQuantize(FakeQuantizeBase):
    """Adaptive Granularity Quantization for post-softmax values (x in [0, 1]): the log2 grid of base 2^(1/tau) and
    scale s of :mod:`ptq4sam.quantization.logq` (one formula for training, evaluation, search and export).

    ``tau`` (1, 2, 4, ...) and ``s`` are chosen by :mod:`ptq4sam.agq`; ``s`` is learnable with LSQ-form gradients.
    ``levels``: ``'paper'`` (2^b non-zero levels + zero, the paper code's 2^b + 1 values) or ``'exact'`` (2^b - 1
    non-zero levels + zero: a b-bit code).
    """

    learnable = True
    uniform = False

    def __init__(self, observer, bit=8, symmetric=False, ch_axis=-1, tau: int = 1, levels: str = "paper"):
        super().__init__(observer, bit, False, -1)
        self.tau = tau
        self.levels_mode = levels
        self.levels = agq_nonzero_levels(bit, levels)  # non-zero levels (codes k < levels)

    def extra_repr(self):
        return super().extra_repr() + f", tau={self.tau}, levels={self.levels_mode}"

    def set_qparams(self, scale, zero_point):
        self.scale = nn.Parameter(scale.detach().clone().reshape(-1).float()[:1])
        self.zero_point = torch.zeros(1, device=self.scale.device)

    @torch.no_grad()
    def init_from_observer(self) -> None:
        if self.observer.num_batches == 0:
            raise RuntimeError("AGQFakeQuantize saw no data: run calibration first")
        self.set_qparams(self.observer.max_val.reshape(-1).amax().clamp(min=1e-8), torch.zeros(1))
        self.initialized = True

    def _eval_params(self):
        return self.scale.detach().abs().clamp(min=1e-8), None

    def quantize(self, x):
        if not torch.is_grad_enabled():
            scale = self._no_grad_params(x)[0]
            if _compiled_agq is not None and x.is_cuda:
                return _compiled_agq(x, scale, self.tau, self.levels)
            return agq_quantize_(x, scale, self.tau, self.levels)
        return agq_quantize(x, self.scale.abs().clamp(min=1e-8), self.tau, self.levels)


_compiled_agq = None


def use_compiled_agq(enabled: bool = True) -> None:
    """Opt-in: evaluate AGQ on CUDA tensors with a ``torch.compile``-fused kernel of the same formula (one pass over
    the softmax map instead of several). Triton's log / exp may differ from eager in the last bit, so results are not
    bit-identical to the default path; benchmarks report it separately (``tools/benchmark_speed.py --compile``)."""
    global _compiled_agq
    _compiled_agq = torch.compile(agq_reference, dynamic=True) if enabled else None


QUANTIZERS: Dict[str, Type[FakeQuantizeBase]] = {
    "FixedFakeQuantize": FixedFakeQuantize,
    "LSQFakeQuantize": LSQFakeQuantize,
    "LSQPlusFakeQuantize": LSQPlusFakeQuantize,
    "AdaRoundFakeQuantize": AdaRoundFakeQuantize,
    "AGQFakeQuantize": AGQFakeQuantize,
}
