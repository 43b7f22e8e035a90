"""PTQ4SAM's two methods (Lv et al., CVPR 2024), yaml section ``ptq4sam``: BIG (bimodal integration: the sign of
bimodal post-k_proj channels folded into q_proj / k_proj) and AGQ (the log2 softmax quantizer of base 2^(1/tau)).
The algorithms are in :mod:`ptq4sam.big` and :mod:`ptq4sam.agq`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from .. import agq as agq_mod
from .. import big as big_mod
from ..quantization import OBSERVERS, QuantizerConfig
from .base import Method, check_choice, kept_embeddings, softmax_search


@dataclass
class PTQ4SAMSection:
    BIG: bool = True
    AGQ: bool = True
    global_num: int = 128
    peak_distance: int = 32
    peak_height: float = 0.01
    big_layers: List[str] = field(default_factory=lambda: ["token_to_image", "final_attn_token_to_image"])
    taus: List[int] = field(default_factory=lambda: [1, 2, 4])
    scale_ratios: List[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    agq_images: int = 0  # calibration images the AGQ search sees (0 = all, the paper)
    agq_search: str = "paper"  # 'paper': per tau and image a bounded scalar search of s; 'grid': tau x scale_ratios
    # AGQ's levels at b bits: 'paper' = the paper code's 2^b non-zero levels + an exact zero (2^b + 1 values, one
    # more than b bits hold); 'exact' = 2^b - 1 non-zero levels + zero (a b-bit code, for export / integer kernels)
    agq_levels: str = "paper"
    p: float = 2.4
    big_sample: str = "first_prompt"  # BIG's test data: 'first_prompt' of the first image (the paper) or 'pooled'
    big_bandwidth: str = "scott"  # KDE bandwidth: 'scott' (scipy's gaussian_kde default) or 'silverman'
    big_k_observer: str = "AvgMSEFastObserver"  # observer of the decoder key quantizers when BIG is on ('' = a_qconfig's)

    def check(self, bad, q) -> None:
        if self.global_num < 3 or self.peak_distance < 1 or not 0 <= self.peak_height < 1:
            bad("ptq4sam", "needs global_num >= 3, peak_distance >= 1 and 0 <= peak_height < 1")
        if not self.taus or any(not isinstance(t, int) or t < 1 for t in self.taus):
            bad("ptq4sam.taus", f"must be a list of positive integers, got {self.taus}")
        if self.agq_images < 0:
            bad("ptq4sam.agq_images", f"must be >= 0 (0 = all calibration images), got {self.agq_images}")
        check_choice(bad, "ptq4sam.agq_search", self.agq_search, ("paper", "grid"))
        check_choice(bad, "ptq4sam.agq_levels", self.agq_levels, ("paper", "exact"))
        check_choice(bad, "ptq4sam.big_sample", self.big_sample, ("first_prompt", "pooled"))
        check_choice(bad, "ptq4sam.big_bandwidth", self.big_bandwidth, ("scott", "silverman"))
        if self.big_k_observer and self.big_k_observer not in OBSERVERS:
            bad("ptq4sam.big_k_observer", f"unknown '{self.big_k_observer}', expected '' or one of {sorted(OBSERVERS)}")


class BIG(Method):
    name, section, section_cls = "big", "ptq4sam", PTQ4SAMSection
    structural = ("ptq4sam.BIG", "ptq4sam.big_k_observer")

    def enabled(self, sec, qcfg) -> bool:
        return sec.BIG

    def site_quantizer(self, sec, site, ctx, base, **kw):
        # the paper: with BIG, every decoder attention's key quantizer is the sign-aware one with an MSE observer
        if site == "attn_key" and kw.get("decoder") and sec.big_k_observer:
            return base.with_(observer=sec.big_k_observer, observer_kwargs={"p": base.observer_kwargs.get("p", 2.4)})
        return None

    def after_encoder(self, sec, job):
        from ..quant_sam import QuantDecoderAttention, quant_attentions  # noqa: PLC0415
        from ..samples import record  # noqa: PLC0415

        dec_atts = [a for a in quant_attentions(job.seg.sam.mask_decoder) if isinstance(a, QuantDecoderAttention)]
        targets = [a for a in dec_atts if any(a.role.endswith(r) for r in sec.big_layers)]
        first = sec.big_sample == "first_prompt"  # the paper tests the first image only
        k_posts = record(job.seg, job.boxed[:1] if first else job.boxed, targets, ["k_post"], desc="BIG: post-k_proj",
                         rows_per_image=None if first else 4096, feats=job.box_feats[:1] if first else job.box_feats)
        report = big_mod.apply_big(targets, {i: r["k_post"] for i, r in k_posts.items()}, sec.global_num,
                                   sec.peak_distance, sec.peak_height, sample=sec.big_sample, bw_rule=sec.big_bandwidth)
        flipped = [e["layer"] for e in report if e["bimodal"]]
        job.log(f"BIG: bimodal and flipped: {flipped or 'none'} (of {[e['layer'] for e in report]})")
        return report


class AGQ(Method):
    name, section, section_cls = "agq", "ptq4sam", PTQ4SAMSection
    structural = ("ptq4sam.AGQ", "ptq4sam.agq_levels")

    def enabled(self, sec, qcfg) -> bool:
        return sec.AGQ and qcfg.a_qconfig.bit is not None

    def site_quantizer(self, sec, site, ctx, base, **kw):
        if site != "softmax" or ctx.a_cfg.bit is None:
            return None
        return QuantizerConfig(quantizer="AGQFakeQuantize", observer="MinMaxObserver", bit=ctx.a_cfg.bit,
                               symmetric=False, ch_axis=-1, quantizer_kwargs={"levels": sec.agq_levels})

    def after_calibration(self, sec, job) -> List[Dict]:
        """Choose tau and s of every AGQ quantizer (the paper's per-image search or the grid)."""
        from ..quant_sam import quant_attentions  # noqa: PLC0415
        from ..samples import record  # noqa: PLC0415

        seg, device = job.seg, job.device
        atts = [a for a in quant_attentions(seg.sam) if a.uses_agq]
        if not atts:  # every softmax site taken by another method (LNQ)
            return None
        use = job.boxed[: sec.agq_images] if sec.agq_images else job.boxed
        if sec.agq_search == "paper":
            results = softmax_search(job, atts, use, lambda a: agq_mod.PaperAGQSearch(
                a.attn_quant.quantizer.bit, sec.taus, sec.p, a.attn_quant.quantizer.levels_mode), "AGQ: per-image search")
        else:
            recs = record(seg, use, atts, ["attn", "v"], desc="AGQ: softmax", feats=kept_embeddings(job, use))
            results = {id(a): agq_mod.search_tau(list(zip(recs[id(a)]["attn"], recs[id(a)]["v"])),
                                                 a.attn_quant.quantizer.bit, sec.taus, sec.scale_ratios, sec.p,
                                                 a.attn_quant.quantizer.levels_mode) for a in atts}
            del recs
        out = []
        for a in atts:
            res = results[id(a)]
            q = a.attn_quant.quantizer
            q.tau = res["tau"]
            q.set_qparams(torch.tensor([res["scale"]], device=device), torch.zeros(1, device=device))
            q.initialized = True
            out.append({"layer": getattr(a, "role", type(a).__name__), **res})
        job.log(f"AGQ: tau per attention {[e['tau'] for e in out]}")
        return out
