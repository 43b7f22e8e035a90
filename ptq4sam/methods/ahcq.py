"""AHCQ-SAM's methods (Zhang et al., "AHCQ-SAM"; code Wenlun-Zhang/AHCQ-SAM), yaml section ``ahcqsam``: LNQ, the
log-transform softmax quantizer (:mod:`ptq4sam.quantization.lnq`, searched by :mod:`ptq4sam.lnq`), which takes the
softmax sites before PTQ4SAM's AGQ does. AHCQ-SAM's HLUQ and CAG are AHCPTQ's (section ``ahcptq``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from .. import lnq as lnq_mod
from ..quantization import QuantizerConfig
from .base import Method, softmax_search


@dataclass
class AHCQSection:
    LNQ: bool = False  # softmax outputs: LNQ (log-transform grid) instead of AGQ / the uniform quantizer
    lnq_alphas: List[float] = field(default_factory=lambda: list(lnq_mod.ALPHAS))  # the curvature grid (the authors')
    lnq_p: float = 2.4  # the search's error |Q(attn) v - attn v|^p
    lnq_images: int = 0  # calibration images (with boxes) the LNQ search sees (0 = all)

    def check(self, bad, q) -> None:
        if not self.lnq_alphas or any(not a > 0 for a in self.lnq_alphas):
            bad("ahcqsam.lnq_alphas", f"must be a list of positive numbers, got {self.lnq_alphas}")
        if not 0 < self.lnq_p <= 16:
            bad("ahcqsam.lnq_p", f"must be in (0, 16], got {self.lnq_p}")
        if self.lnq_images < 0:
            bad("ahcqsam.lnq_images", f"must be >= 0 (0 = all calibration images), got {self.lnq_images}")
        if self.LNQ and q.a_qconfig.bit is None:
            bad("ahcqsam.LNQ", "quantizes activations: a_qconfig.bit must not be off")


class LNQ(Method):
    name, section, section_cls = "lnq", "ahcqsam", AHCQSection
    structural = ("ahcqsam.LNQ",)

    def enabled(self, sec, qcfg) -> bool:
        return sec.LNQ and qcfg.a_qconfig.bit is not None

    def site_quantizer(self, sec, site, ctx, base, **kw):
        if site != "softmax" or ctx.a_cfg.bit is None:
            return None
        return QuantizerConfig(quantizer="LNQFakeQuantize", observer="MinMaxObserver", bit=ctx.a_cfg.bit,
                               symmetric=False, ch_axis=-1)

    def after_calibration(self, sec, job) -> List[Dict]:
        """Choose alpha and s of every LNQ quantizer (:class:`ptq4sam.lnq.LNQSearch`, one image at a time)."""
        from ..quant_sam import quant_attentions  # noqa: PLC0415
        from ..quantization.lnq import LNQFakeQuantize  # noqa: PLC0415

        atts = [a for a in quant_attentions(job.seg.sam) if isinstance(a.attn_quant.quantizer, LNQFakeQuantize)]
        if not atts:
            return None
        use = job.boxed[: sec.lnq_images] if sec.lnq_images else job.boxed
        results = softmax_search(job, atts, use, lambda a: lnq_mod.LNQSearch(a.attn_quant.quantizer.bit,
                                                                             sec.lnq_alphas, sec.lnq_p),
                                 "LNQ: per-image search")
        out = []
        for a in atts:
            res, q = results[id(a)], a.attn_quant.quantizer
            q.lnq_alpha = res["alpha"]
            q.set_qparams(torch.tensor([res["scale"]], device=job.device), torch.zeros(1, device=job.device))
            q.initialized = True
            out.append({"layer": getattr(a, "role", type(a).__name__), **res})
        job.log(f"LNQ: alpha per attention {[e['alpha'] for e in out]}")
        return out
