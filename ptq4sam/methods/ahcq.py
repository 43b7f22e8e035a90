"""AHCQ-SAM's methods (Zhang et al., "AHCQ-SAM"; code Wenlun-Zhang/AHCQ-SAM), yaml section ``ahcqsam``: ACNR, the
activation-aware condition-number reduction of Linear weights before they are quantized (:mod:`ptq4sam.acnr`), and
LNQ, the log-transform softmax quantizer (:mod:`ptq4sam.quantization.lnq`, searched by :mod:`ptq4sam.lnq`), which
takes the softmax sites before PTQ4SAM's AGQ does. AHCQ-SAM's HLUQ and CAG are AHCPTQ's (section ``ahcptq``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from .. import acnr as acnr_mod
from .. import lnq as lnq_mod
from ..progress import progress
from ..quantization import QuantizerConfig
from .base import Method, kept_embeddings, layer_input_samples, softmax_search


@dataclass
class AHCQSection:
    LNQ: bool = False  # softmax outputs: LNQ (log-transform grid) instead of AGQ / the uniform quantizer
    lnq_alphas: List[float] = field(default_factory=lambda: list(lnq_mod.ALPHAS))  # the curvature grid (the authors')
    lnq_p: float = 2.4  # the search's error |Q(attn) v - attn v|^p
    lnq_images: int = 0  # calibration images (with boxes) the LNQ search sees (0 = all)
    ACNR: bool = False  # Linear weights with condition number >= acnr_kappa: tail singular values raised
    acnr_iters: int = 0  # proximal steps; 0 = the authors' by weight bits: 200 below 6 bits, 20 from 6 bits
    acnr_lambda: float = acnr_mod.LAMBDA  # pull of the tail towards the mean singular value
    acnr_beta: float = acnr_mod.BETA  # weight of the activation-quantization error along each singular direction
    acnr_energy: float = acnr_mod.ENERGY  # the head (kept) holds this fraction of the s^2 energy
    acnr_kappa: float = acnr_mod.KAPPA_MIN  # layers below this condition number are left as they are
    acnr_images: int = 0  # calibration images the activation errors come from (0 = all; the authors: 32)

    def check(self, bad, q) -> None:
        if not self.lnq_alphas or any(not a > 0 for a in self.lnq_alphas):
            bad("ahcqsam.lnq_alphas", f"must be a list of positive numbers, got {self.lnq_alphas}")
        if not 0 < self.lnq_p <= 16:
            bad("ahcqsam.lnq_p", f"must be in (0, 16], got {self.lnq_p}")
        if self.lnq_images < 0:
            bad("ahcqsam.lnq_images", f"must be >= 0 (0 = all calibration images), got {self.lnq_images}")
        if self.LNQ and q.a_qconfig.bit is None:
            bad("ahcqsam.LNQ", "quantizes activations: a_qconfig.bit must not be off")
        if self.acnr_iters < 0:
            bad("ahcqsam.acnr_iters", f"must be >= 0 (0 = by weight bits), got {self.acnr_iters}")
        for key in ("acnr_lambda", "acnr_beta"):
            if not getattr(self, key) >= 0:
                bad(f"ahcqsam.{key}", f"must be >= 0, got {getattr(self, key)}")
        if not 0 < self.acnr_energy < 1:
            bad("ahcqsam.acnr_energy", f"must be in (0, 1), got {self.acnr_energy}")
        if not self.acnr_kappa >= 1:
            bad("ahcqsam.acnr_kappa", f"must be >= 1 (a condition number), got {self.acnr_kappa}")
        if self.acnr_images < 0:
            bad("ahcqsam.acnr_images", f"must be >= 0 (0 = all calibration images), got {self.acnr_images}")
        if self.ACNR and (q.a_qconfig.bit is None or q.w_qconfig.bit is None):
            bad("ahcqsam.ACNR", "needs quantized weights and activations: a_qconfig.bit and w_qconfig.bit must be set")


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


class ACNR(Method):
    name, section, section_cls = "acnr", "ahcqsam", AHCQSection

    def enabled(self, sec, qcfg) -> bool:
        return sec.ACNR and qcfg.a_qconfig.bit is not None and qcfg.w_qconfig.bit is not None

    def before_weights(self, sec, job):
        """After the activation quantizers are calibrated, before the weights are observed: each Linear weight with
        kappa >= acnr_kappa whose input is quantized gets ACNR's weight as what its quantizer rounds."""
        from ..quantization import QuantLinear  # noqa: PLC0415

        sam = job.seg.sam
        layers, svds, skipped = {}, {}, []
        for n, m in sam.named_modules():
            if not isinstance(m, QuantLinear) or m.weight_quantizer is None:
                continue
            aq = m.input_quant.quantizer
            if aq is None or not aq.initialized:
                skipped.append({"layer": n, "why": "input not quantized"})
                continue
            svd = acnr_mod.LayerSVD.of(m.weight)
            kappa = acnr_mod.condition_number(svd.s)
            if kappa >= sec.acnr_kappa:
                layers[n], svds[n] = m, svd
            else:
                skipped.append({"layer": n, "kappa": round(kappa, 2)})
        if not layers:
            job.log(f"ACNR: no Linear layer with condition number >= {sec.acnr_kappa}")
            return {"layers": 0, "skipped": skipped}
        use = layer_input_samples(job)
        use = use[: sec.acnr_images] if sec.acnr_images else use
        acnr_mod.collect_errors(job.seg, use, kept_embeddings(job, use), layers, svds, progress)
        unreached = [n for n, v in svds.items() if v.n == 0]
        for n in unreached:
            skipped.append({"layer": n, "why": "no calibration input reached it"})
            del svds[n]
        iters = sec.acnr_iters or acnr_mod.default_iters(job.qcfg.w_qconfig.bit)
        new, report = acnr_mod.treat(svds, {n: layers[n].weight for n in svds}, iters, sec.acnr_lambda,
                                     sec.acnr_beta, sec.acnr_energy)
        for n, w in new.items():
            layers[n].set_quant_source(w)
        med = sorted(r["kappa_after"] / r["kappa_before"] for r in report)[len(report) // 2] if report else None
        job.log(f"ACNR: {len(report)} of {len(report) + len(skipped)} Linear layers treated "
                f"(median kappa after / before {med:.3g}); {len(skipped)} left as they are" if report else
                "ACNR: no layer treated")
        return {"layers": len(report), "iters": iters, "images": len(use), "per_layer": report, "skipped": skipped}
