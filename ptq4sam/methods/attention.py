"""Where an attention is quantized, yaml section ``attention``. ``placement: paper`` (the default, PTQ4SAM's): q and
k before q.k^T, the softmax output (AGQ's, LNQ's or the plain quantizer) and v before attn.v. ``placement: nncf``
(NNCF's transformer preset, as OpenVINO's NNCF places it): q and k symmetric (signed, zero point 0), softmax.v left
float (neither the softmax output nor v quantized), so that a runtime can fuse the whole attention (q.k^T, softmax,
attn.v) into one kernel. The softmax quantizers (``ptq4sam.AGQ``, ``ahcqsam.LNQ``) have nothing to quantize then and
must be off."""
from __future__ import annotations

from dataclasses import dataclass

from .base import FLOAT, Method, check_choice

PLACEMENTS = ("paper", "nncf")


@dataclass
class AttentionSection:
    placement: str = "paper"

    def check(self, bad, q) -> None:
        check_choice(bad, "attention.placement", self.placement, PLACEMENTS)
        if self.placement == "nncf":
            on = [k for k, v in (("ptq4sam.AGQ", q.ptq4sam.AGQ), ("ahcqsam.LNQ", q.ahcqsam.LNQ)) if v]
            if on:
                bad("attention.placement", f"'nncf' leaves the softmax output float: turn {' and '.join(on)} off "
                    f"(set {on[0]}=false)")


class NNCFAttention(Method):
    name, section, section_cls = "nncf_attention", "attention", AttentionSection
    structural = ("attention.placement",)

    def enabled(self, sec, qcfg) -> bool:
        return sec.placement == "nncf"

    def site_quantizer(self, sec, site, ctx, base, **kw):
        if site in ("softmax", "attn_value"):
            return FLOAT
        if site in ("attn_query", "attn_key"):
            return base.with_(symmetric=True)
        return None
