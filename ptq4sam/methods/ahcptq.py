"""AHCPTQ's two quantizers (Zhang et al., ICCV 2025), yaml section ``ahcptq``: HLUQ (hybrid log-uniform grid for
post-GELU inputs) and CAG (channel-aware grouping of the other linear inputs). The quantizers are in
:mod:`ptq4sam.quantization.hluq` and :mod:`ptq4sam.quantization.cag`; ``convs`` extends both to convolutions (ours)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ..quantization import OBSERVERS, QuantizerConfig
from ..quantization.cag import GROUP_RANGES
from .base import Method


@dataclass
class AHCPTQSection:
    HLUQ: bool = False  # post-GELU linear inputs: hybrid log-uniform quantizer (HLUQFakeQuantize)
    CAG: bool = False  # other linear inputs: channel-aware groups sharing scale / zero point (CAGFakeQuantize)
    groups: int = 4  # CAG groups per layer (AHCPTQ's `group: 4`); 1 = per tensor
    cag_observer: str = "AvgMinMaxObserver"  # per-channel ranges the CAG groups are built from (AHCPTQ's choice)
    hluq_groups: int = 1  # HLUQ grids per layer, channels grouped as CAG does (ours; AHCPTQ: 1 = per tensor)
    convs: bool = False  # also dense convolutions' inputs (TinyViT, SAM's neck): HLUQ after a GELU, CAG elsewhere
    range_rates: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])  # HLUQ split-point candidates
    grid_rates: List[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])  # HLUQ share of log levels
    top_rates: List[float] = field(default_factory=lambda: [1.0])  # HLUQ range clipped at the top (ours; AHCPTQ: 1)
    # a CAG / grouped HLUQ group's range: "channel" = the union of its channels' batch-averaged ranges (AHCPTQ's
    # per-channel statistics); "batch" = per batch the union of its channels' ranges, then averaged over batches (ours)
    group_range: str = "channel"

    def check(self, bad, q) -> None:
        if self.groups < 1:
            bad("ahcptq.groups", f"must be >= 1, got {self.groups}")
        if self.hluq_groups < 1:
            bad("ahcptq.hluq_groups", f"must be >= 1, got {self.hluq_groups}")
        if not self.range_rates or any(not 0 < r < 1 for r in self.range_rates):
            bad("ahcptq.range_rates", f"must be a list of numbers in (0, 1), got {self.range_rates}")
        if not self.grid_rates or any(not 0 < r < 1 for r in self.grid_rates):
            bad("ahcptq.grid_rates", f"must be a list of numbers in (0, 1), got {self.grid_rates}")
        if not self.top_rates or any(not 0 < r <= 1 for r in self.top_rates):
            bad("ahcptq.top_rates", f"must be a list of numbers in (0, 1], got {self.top_rates}")
        if self.group_range not in GROUP_RANGES:
            bad("ahcptq.group_range", f"expected one of {list(GROUP_RANGES)}, got {self.group_range!r}")
        if self.cag_observer not in OBSERVERS:
            bad("ahcptq.cag_observer", f"unknown '{self.cag_observer}', expected one of {sorted(OBSERVERS)}")
        if (self.HLUQ or self.CAG) and q.a_qconfig.bit is None:
            bad("ahcptq", "HLUQ / CAG quantize activations: a_qconfig.bit must not be off")


def _hluq_cfg(sec: AHCPTQSection, bit: int, ch_axis: int, groups: int) -> QuantizerConfig:
    return QuantizerConfig("HLUQFakeQuantize", "HybridRangeObserver", bit, False, ch_axis,
                           observer_kwargs={"range_rates": list(sec.range_rates), "grid_rates": list(sec.grid_rates),
                                            "top_rates": list(sec.top_rates), "groups": groups,
                                            "group_range": sec.group_range})


class HLUQ(Method):
    name, section, section_cls = "hluq", "ahcptq", AHCPTQSection
    structural = ("ahcptq.HLUQ", "ahcptq.convs", "ahcptq.hluq_groups")

    def enabled(self, sec, qcfg) -> bool:
        return sec.HLUQ and qcfg.a_qconfig.bit is not None

    def site_quantizer(self, sec, site, ctx, base, **kw):
        if not ctx.post_gelu or ctx.a_cfg.bit is None:
            return None
        if site == "linear_input":
            return _hluq_cfg(sec, ctx.a_cfg.bit, kw.get("ch_axis", -1), sec.hluq_groups)
        if site == "conv_input" and sec.convs:
            conv = kw["conv"]
            if kw.get("depthwise"):  # one HLUQ grid per channel (a per-channel scale folds into the weights)
                return _hluq_cfg(sec, ctx.a_cfg.bit, 1, conv.in_channels)
            if conv.groups == 1:
                return _hluq_cfg(sec, ctx.a_cfg.bit, 1, sec.hluq_groups)
        return None


class CAG(Method):
    name, section, section_cls = "cag", "ahcptq", AHCPTQSection
    structural = ("ahcptq.CAG", "ahcptq.groups", "ahcptq.cag_observer", "ahcptq.convs")

    def enabled(self, sec, qcfg) -> bool:
        return sec.CAG and qcfg.a_qconfig.bit is not None

    def site_quantizer(self, sec, site, ctx, base, **kw):
        if site == "linear_input":
            ch_axis = kw.get("ch_axis", -1)
        elif site == "conv_input" and sec.convs and not kw.get("depthwise") and kw["conv"].groups == 1:
            ch_axis = 1  # G groups of channels: G partial integer convolutions
        else:
            return None
        a = ctx.a_cfg
        qkw = {k: v for k, v in a.quantizer_kwargs.items() if k == "grad_scale_mode"}
        okw = {"p": a.observer_kwargs.get("p", 2.4)} if "MSE" in sec.cag_observer else {}
        qkw.update(groups=sec.groups, group_range=sec.group_range)
        return a.with_(quantizer="CAGFakeQuantize", quantizer_kwargs=qkw,
                       observer=sec.cag_observer, observer_kwargs=okw, ch_axis=ch_axis)
