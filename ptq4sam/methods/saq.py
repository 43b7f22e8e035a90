"""SAQ-SAM's methods (Zhu et al., "SAQ-SAM"; code jingjing0419/SAQ-SAM), yaml section ``saqsam``: PCC, the clipping of
the mask decoder's attention inputs by the focus of the attention maps (:mod:`ptq4sam.pcc`), after calibration and
before reconstruction (whose scale learning starts from the chosen clips, as the authors'); PAR, the prompt-aware
reconstruction (:mod:`ptq4sam.par`: its units and loss)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from .. import par as par_mod
from .. import pcc as pcc_mod
from ..quantization import FakeQuantizeBase, disable_all, qparams_from_range
from .base import Method, kept_embeddings


@dataclass
class SAQSection:
    PCC: bool = False  # decoder attention inputs (q_proj / k_proj inputs, projected Q / K): clips by attention focus
    pcc_quantiles: List[float] = field(default_factory=lambda: list(pcc_mod.QUANTILES))  # the authors' grid
    pcc_theta: float = 0.5  # focus: values above theta x the row's maximum
    pcc_images: int = 1  # calibration images (with boxes) the search sees (the authors: 1)
    PAR: bool = False  # prompt-aware reconstruction: SAQ-SAM's units (encoder stages, decoder blocks) and loss
    par_alpha: float = 1.0  # weight of the term through the decoder (prompt tokens / image tokens)
    par_beta: float = 1.0  # weight of a decoder block's own output loss
    par_query_weight: float = 0.01  # within that: the queries' (prompt tokens') share beside the keys' 1
    par_prompts: int = 16  # box prompts per image through the decoder (a seeded subset, fixed per image)

    def check(self, bad, q) -> None:
        if not self.pcc_quantiles or any(not 0.5 < p < 1 for p in self.pcc_quantiles):
            bad("saqsam.pcc_quantiles", f"must be a list of numbers in (0.5, 1), got {self.pcc_quantiles}")
        elif list(self.pcc_quantiles) != sorted(set(self.pcc_quantiles)):
            bad("saqsam.pcc_quantiles", f"must be increasing (ties go to the first, the narrowest clip), got "
                f"{self.pcc_quantiles}")
        if not 0 < self.pcc_theta < 1:
            bad("saqsam.pcc_theta", f"must be in (0, 1), got {self.pcc_theta}")
        if self.pcc_images < 1:
            bad("saqsam.pcc_images", f"must be >= 1, got {self.pcc_images}")
        if self.PCC and q.a_qconfig.bit is None:
            bad("saqsam.PCC", "clips activation quantizers: a_qconfig.bit must not be off")
        for key in ("par_alpha", "par_beta", "par_query_weight"):
            if getattr(self, key) < 0:
                bad(f"saqsam.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.par_prompts < 1:
            bad("saqsam.par_prompts", f"must be >= 1, got {self.par_prompts}")
        if self.PAR and q.recon.iters == 0:
            bad("saqsam.PAR", "is a reconstruction: recon.iters must be > 0 (or set PAR false)")


def _searchable(q) -> bool:
    """A per-tensor uniform quantizer (PCC sets one clip; CAG's groups or a log grid are not its to set)."""
    return isinstance(q, FakeQuantizeBase) and q.uniform and q.ch_axis == -1 and q.initialized


def _set_clip(q, lo: float, hi: float) -> None:
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), q.bit, q.symmetric)
    q.set_qparams(scale.to(q.scale.device), zp.to(q.scale.device))
    q.observer.min_val, q.observer.max_val = (torch.tensor(v, device=q.scale.device) for v in (lo, hi))
    q.fake_quant_enabled = True


class PCC(Method):
    name, section, section_cls = "pcc", "saqsam", SAQSection

    def enabled(self, sec, qcfg) -> bool:
        return sec.PCC and qcfg.a_qconfig.bit is not None

    @torch.no_grad()
    def after_calibration(self, sec, job) -> List[Dict]:
        from ..quant_sam import QuantDecoderAttention, quant_attentions  # noqa: PLC0415
        from ..samples import forward_sample, record  # noqa: PLC0415

        seg, sam = job.seg, job.seg.sam
        atts = [a for a in quant_attentions(sam.mask_decoder) if isinstance(a, QuantDecoderAttention)]
        samples = job.boxed[: sec.pcc_images]
        disable_all(sam)
        # the encoder is never PCC's (float throughout the search): its output once per image
        feats = [f if f is not None else seg.encode(s.image)[0] for f, s in zip(kept_embeddings(job, samples), samples)]
        ref = record(seg, samples, atts, ["attn"], feats=feats, desc="PCC: float attention")
        chosen: List[FakeQuantizeBase] = []
        out = []
        for a in atts:
            disable_all(sam)  # float, but the clips chosen so far (greedy, as the authors)
            for q in chosen:
                q.fake_quant_enabled = True
            inputs = []
            hook = a.register_forward_pre_hook(  # (q, k, v), given by name in segment_anything's blocks
                lambda m, args, kw: inputs.append((kw["q"], kw["k"]) if "q" in kw else (args[0], args[1])),
                with_kwargs=True)
            try:
                for s, f in zip(samples, feats):
                    forward_sample(seg, s, f)
            finally:
                hook.remove()
            targets = ref[id(a)]["attn"]
            points = {"q_in": (a.q_proj.input_quant.quantizer, "q"), "k_in": (a.k_proj.input_quant.quantizer, "k"),
                      "q_post": (a.q_quant.quantizer, "q"), "k_post": (a.k_quant.quantizer, "k")}
            for point in pcc_mod.POINTS:
                q, side = points[point]
                role = f"{getattr(a, 'role', 'attention')}.{point}"
                if not _searchable(q):
                    why = "not quantized" if q is None else "uncalibrated" if not getattr(q, "initialized", False) \
                        else type(q).__name__
                    out.append({"layer": role, "skipped": why})
                    continue
                proj, post = (a.q_proj, a.q_quant) if side == "q" else (a.k_proj, a.k_quant)
                other = [(a.k_quant(a.k_proj(k)) if side == "q" else a.q_quant(a.q_proj(qq))) for qq, k in inputs]
                raw = [qq if side == "q" else k for qq, k in inputs]
                if point.endswith("_in"):  # what this quantizer sees, and the way from there to the attention
                    xs, through = raw, (lambda t, _proj=proj, _post=post: _post(_proj(t)))
                else:
                    xs, through = [proj(r) for r in raw], post  # the input quantizer is settled by now

                def score(_xs=xs, _through=through, _other=other, _side=side):
                    losses = []
                    for x, o, tgt in zip(_xs, _other, targets):
                        qq, kk = (_through(x), o) if _side == "q" else (o, _through(x))
                        losses.append(pcc_mod.focus_loss(a.attention_map(qq, kk), tgt, sec.pcc_theta))
                    return sum(losses) / len(losses)
                rep = pcc_mod.search_point(q, xs, score, sec.pcc_quantiles, _set_clip)
                chosen.append(q)
                out.append({"layer": role, **rep})
        disable_all(sam)
        done = [e for e in out if "quantile" in e]
        job.log(f"PCC: {len(done)} clips chosen (quantiles {sorted({e['quantile'] for e in done})}), "
                f"{len(out) - len(done)} skipped")
        return out


class PAR(Method):
    name, section, section_cls = "par", "saqsam", SAQSection

    def enabled(self, sec, qcfg) -> bool:
        return sec.PAR

    def recon_stages(self, sec, sam, quant_encoder, stages):
        """SAQ-SAM's units: whole stages (``recon.units: stage``), whatever ``recon.units`` says."""
        from ..quant_sam import recon_stages  # noqa: PLC0415

        return recon_stages(sam, quant_encoder, "stage")

    def recon_objective(self, sec, seg, samples, seed):
        return par_mod.PARObjective(seg, samples, sec.par_alpha, sec.par_beta, sec.par_query_weight, sec.par_prompts,
                                    seed)
