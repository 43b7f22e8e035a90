"""Quantized modules: Linear / Conv2d with weight and input quantizers, and bare activation quantization points."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fake_quant import AdaRoundFakeQuantize, FakeQuantizeBase
from .qconfig import QuantizerConfig, build_quantizer
from .weight_cache import observe_weight


class QuantPoint(nn.Module):
    """An activation quantization point (identity when its quantizer is off or absent)."""

    def __init__(self, cfg: Optional[QuantizerConfig]):
        super().__init__()
        self.quantizer = build_quantizer(cfg) if cfg is not None else None

    def forward(self, x):
        return self.quantizer(x) if self.quantizer is not None else x


class _QuantWeightMixin:
    weight_ch_axis = 0  # output channels of the weight

    def _init_quant(self, w_cfg: QuantizerConfig, a_cfg: Optional[QuantizerConfig]):
        self.weight_quantizer = build_quantizer(w_cfg.with_(ch_axis=self.weight_ch_axis) if w_cfg.ch_axis != -1
                                                else w_cfg)
        if self.weight_quantizer is not None:
            self.weight_quantizer.is_weight = True  # observed once from the weight, not during calibration runs
            if hasattr(self.weight_quantizer.observer, "exact"):
                self.weight_quantizer.observer.exact = True  # one observation: the exact range search is affordable
        self.input_quant = QuantPoint(a_cfg)
        if self.input_quant.quantizer is not None:
            self.input_quant.quantizer.is_layer_input = True

    def _show_layer_to_observer(self, fn=None) -> None:
        """While observing, give an input observer that scores ranges by this layer's output (HLUQ's) the layer:
        its float weight, bias and operation (``fn``; None = a row-wise Linear)."""
        q = self.input_quant.quantizer
        if q is not None and q.observer_enabled and hasattr(q.observer, "set_layer"):
            q.observer.set_layer(self.weight, self.bias, fn)

    def quant_source(self) -> torch.Tensor:
        """The tensor the weight quantizer rounds: the float weight, or the weight a method chose for it (GPTQ's,
        ACNR's: :meth:`set_quant_source`; kept in the buffer ``gptq_weight``, its name in every saved state). The
        float weight itself never changes, so a forward with the quantizers off is the float model's."""
        src = self._buffers.get("gptq_weight")
        return self.weight if src is None else src

    @torch.no_grad()
    def set_quant_source(self, w: torch.Tensor) -> None:
        """Quantize ``w`` (same shape as the weight, e.g. GPTQ's or ACNR's weight) instead of the float weight;
        the float weight stays for float forwards and as the reconstruction's reference."""
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"quantization source of shape {tuple(w.shape)} for a weight of {tuple(self.weight.shape)}")
        self.register_buffer("gptq_weight", w.detach().to(self.weight).clone())
        self.unfreeze()

    def qweight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None or not wq.fake_quant_enabled:
            return self.weight
        src = self.quant_source()
        if not torch.is_grad_enabled():
            frozen = self.__dict__.get("_frozen_weight")  # (source version, device, quantized weight)
            if frozen is not None and frozen[0] == src._version and frozen[1] == src.device:
                return frozen[2]
        return wq(src)

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantize the weight once for evaluation (it is fixed once AdaRound is hardened); an in-place change of
        the weight, a move to another device or any state switch (:func:`unfreeze`) drops the cached copy."""
        self.unfreeze()
        wq = self.weight_quantizer
        if wq is not None and wq.fake_quant_enabled:
            src = self.quant_source()
            self.__dict__["_frozen_weight"] = (src._version, src.device, wq(src).detach())

    def unfreeze(self) -> None:
        self.__dict__.pop("_frozen_weight", None)

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Observe the weight to quantize (:meth:`quant_source`) once and initialise its quantizer (and AdaRound's
        alpha)."""
        wq = self.weight_quantizer
        if wq is None:
            return
        w = self.quant_source()
        wq.check_finite(w, "weights")
        observe_weight(wq.observer, w)  # cached: the 2-D range search is the costly part of calibration
        wq.init_from_observer()
        if isinstance(wq, AdaRoundFakeQuantize) and wq.learnable:
            wq.init_alpha(w)


class QuantLinear(nn.Linear, _QuantWeightMixin):
    """nn.Linear whose input and weight are fake-quantized. Built from a float Linear (weights shared)."""

    @classmethod
    def from_float(cls, m: nn.Linear, w_cfg: QuantizerConfig, a_cfg: Optional[QuantizerConfig]):
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = m.in_features, m.out_features
        q.weight, q.bias = m.weight, m.bias
        q._init_quant(w_cfg, a_cfg)
        return q

    def forward(self, x):
        self._show_layer_to_observer()
        return F.linear(self.input_quant(x), self.qweight(), self.bias)


class QuantConv2d(nn.Conv2d, _QuantWeightMixin):
    """nn.Conv2d whose input and weight are fake-quantized."""

    @classmethod
    def from_float(cls, m: nn.Conv2d, w_cfg: QuantizerConfig, a_cfg: Optional[QuantizerConfig]):
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(q, k, getattr(m, k))
        q.weight, q.bias = m.weight, m.bias
        q._init_quant(w_cfg, a_cfg)
        return q

    def forward(self, x):
        self._show_layer_to_observer(self._conv_forward)
        return self._conv_forward(self.input_quant(x), self.qweight(), self.bias)


class QuantConvTranspose2d(nn.ConvTranspose2d, _QuantWeightMixin):
    """nn.ConvTranspose2d whose input and weight are fake-quantized; its weight is (in, out / groups, kH, kW), so
    per-channel weight quantization runs along axis 1 (output channels)."""

    weight_ch_axis = 1

    @classmethod
    def from_float(cls, m: nn.ConvTranspose2d, w_cfg: QuantizerConfig, a_cfg: Optional[QuantizerConfig]):
        if m.groups != 1:
            raise ValueError(f"QuantConvTranspose2d: grouped transposed convolutions (groups={m.groups}) are not "
                             "supported (per-channel weight axis 1 would mix groups)")
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode", "transposed", "output_padding"):
            setattr(q, k, getattr(m, k))
        q.weight, q.bias = m.weight, m.bias
        q._init_quant(w_cfg, a_cfg)
        return q

    def forward(self, x, output_size=None):
        out_pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(self.input_quant(x), self.qweight(), self.bias, self.stride, self.padding,
                                  out_pad, self.groups, self.dilation)


def quantizers(module: nn.Module):
    """All fake quantizers under ``module`` (named)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, FakeQuantizeBase)]
