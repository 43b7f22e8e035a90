"""Where an attention is quantized, yaml section ``attention``. ``placement: paper`` (the default, PTQ4SAM's): q and
k before q.k^T, the softmax output (AGQ's, LNQ's or the plain quantizer) and v before attn.v. ``placement: nncf``
(NNCF's transformer preset, as OpenVINO's NNCF places it): q and k symmetric (signed, zero point 0), softmax.v left
float (neither the softmax output nor v quantized), so that a runtime can fuse the whole attention (q.k^T, softmax,
attn.v) into one kernel. ``placement: float``: no quantizer inside the attention at all (q, k, v and the softmax output
float; its Linear layers stay quantized), the form OpenVINO fuses and runs fastest on a CPU without int8 dot products
(``docs/deploy.md``). With ``nncf`` or ``float`` the softmax quantizers (``ptq4sam.AGQ``, ``ahcqsam.LNQ``) have
nothing to quantize and BIG's sign-aware key quantizer is not used (symmetric or float keys): all three must be off."""
from __future__ import annotations

from dataclasses import dataclass

from .base import FLOAT, Method, check_choice

PLACEMENTS = ("paper", "nncf", "float")


@dataclass
class AttentionSection:
    placement: str = "paper"

    def check(self, bad, q) -> None:
        check_choice(bad, "attention.placement", self.placement, PLACEMENTS)
        if self.placement != "paper":
            on = [k for k, v in (("ptq4sam.AGQ", q.ptq4sam.AGQ), ("ahcqsam.LNQ", q.ahcqsam.LNQ),
                                 ("ptq4sam.BIG", q.ptq4sam.BIG)) if v]
            if on:
                bad("attention.placement", f"{self.placement!r} places the attention's quantizers itself (softmax "
                    f"output float, keys symmetric or float): turn {' and '.join(on)} off (set {on[0]}=false)")


class AttentionPlacement(Method):
    name, section, section_cls = "attention_placement", "attention", AttentionSection
    structural = ("attention.placement",)

    def enabled(self, sec, qcfg) -> bool:
        return sec.placement != "paper"

    def site_quantizer(self, sec, site, ctx, base, **kw):
        if site not in ("softmax", "attn_query", "attn_key", "attn_value"):
            return None
        if sec.placement == "nncf" and site in ("attn_query", "attn_key"):
            return base.with_(symmetric=True)
        return FLOAT
