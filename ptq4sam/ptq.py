"""The PTQ pipeline on a BoxPromptSegmenter (torch only): smoothing, convert, calibrate (BIG, GPTQ, AGQ),
reconstruct, finalise for evaluation. Each step is its own function, so a caller can calibrate once and reconstruct
with several seeds (the calibration does not depend on the seed)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from . import agq as agq_mod
from . import big as big_mod
from . import gptq as gptq_mod
from . import smooth as smooth_mod
from .checkpoint import ReconCheckpoint, restore_quant_state
from .errors import InputError
from .progress import PhaseTimer
from .progress import progress as _progress
from .qconfig import QConfig
from .quant_sam import QuantDecoderAttention, build_context, quant_attentions, quantization_report, quantize_sam, recon_stages
from .quantization import (
    AdaRoundFakeQuantize,
    AGQFakeQuantize,
    FakeQuantizeBase,
    disable_all,
    enable_calibration,
    enable_quantization,
    freeze,
    harden_all,
    set_drop_prob,
)
from .quantization.state import count_hard
from .reconstruction import global_rng, reconstruct
from .samples import CalibSample, act_quantizers, forward_sample, has_boxes, quantized_layers, record


# ---- the whole pipeline ---------------------------------------------------------------------------------------
@dataclass
class Calibrated:
    """A calibrated model's record between calibration and reconstruction: what happened so far (``info``), the
    phase times, and the state to resume from (``saved``: a :class:`ReconCheckpoint` state, or None)."""

    info: Dict[str, Any]
    timer: PhaseTimer
    quant_encoder: bool
    saved: Optional[Dict] = None


def quantize_segmenter(seg, samples: List[CalibSample], qcfg: QConfig, quant_encoder: bool, device,
                       paper_eval_bugs: bool = False, log=print, checkpoint: Optional[ReconCheckpoint] = None) -> Dict:
    """Quantize ``seg.sam`` in place (:func:`calibrate_segmenter`, then :func:`reconstruct_segmenter`); returns what
    happened (for metrics.json).

    ``paper_eval_bugs`` reproduces the two leaks of the paper code's evaluation (see :func:`reconstruct`): layer
    inputs left at QDrop's drop probability and only the first AdaRound layer of each unit hardened.
    ``checkpoint``: save the state after calibration and after every reconstruction unit; with its ``resume`` set,
    continue from the state it holds (see :class:`ReconCheckpoint`)."""
    cal = calibrate_segmenter(seg, samples, qcfg, quant_encoder, device, log, checkpoint)
    return reconstruct_segmenter(seg, samples, qcfg, device, cal, paper_eval_bugs=paper_eval_bugs, checkpoint=checkpoint)


def calibrate_segmenter(seg, samples: List[CalibSample], qcfg: QConfig, quant_encoder: bool, device, log=print,
                        checkpoint: Optional[ReconCheckpoint] = None) -> Calibrated:
    """Smoothing, conversion and calibration (BIG, weights and activations, GPTQ, AGQ) of ``seg.sam`` in place. It
    draws no random numbers: the result does not depend on the seed, so one calibration can be reconstructed with
    several seeds (a copy each). With ``checkpoint.resume`` and a saved state, the state is loaded instead."""
    info: Dict[str, Any] = {}
    timer = PhaseTimer()
    sam = seg.sam
    boxed = [s for s in samples if has_boxes(s)]
    if not boxed:
        raise InputError(f"none of the {len(samples)} calibration images has a box: the decoder cannot be calibrated "
                         "(use images with annotations, or a detector / score threshold that finds objects)")
    if len(boxed) < len(samples):
        log(f"calibration: {len(samples) - len(boxed)} of {len(samples)} images have no box; they calibrate the "
            "encoder only (the decoder, BIG, AGQ's decoder attentions and decoder reconstruction skip them)")
    for p in sam.parameters():
        p.requires_grad_(False)
    if qcfg.smooth.enabled:  # (on --resume too: deterministic, and the saved state's weights replace them anyway)
        with timer.phase("smoothing"):
            sam.to(device)

            def run():
                with torch.no_grad():
                    for s in _progress(samples, desc="smoothing: statistics"):
                        forward_sample(seg, s)
            n_sites, info["smooth"] = smooth_mod.smooth_sam(sam, quant_encoder, run, qcfg.smooth.alpha,
                                                          tuple(qcfg.smooth.folds))
        log(f"smoothing: {len(info['smooth'])} of {n_sites} sites folded (alpha={qcfg.smooth.alpha})")
    ctx = build_context(qcfg)
    quantize_sam(sam, ctx, quant_encoder, float_modules=tuple(qcfg.float_modules))
    n_units = sum(len(u) for _, u in recon_stages(sam, quant_encoder, qcfg.recon.units))
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:  # --resume: calibration, BIG and AGQ are in the saved state
        restore_quant_state(sam, saved, checkpoint.path)
        sam.to(device)
        info = saved["info"]
        info["resumed_after_unit"] = saved["units_done"]
        for k, v in info["pre_recon_phases_s"].items():  # the interrupted run's calibration, BIG, GPTQ, AGQ
            timer.add(k, v)
        log(f"--resume: {checkpoint.path}: calibration done, {saved['units_done']} of {n_units} reconstruction units "
            "done; continuing")
        return Calibrated(info, timer, quant_encoder, saved)
    info["calib_images"], info["calib_images_without_boxes"] = len(samples), len(samples) - len(boxed)
    info["layers"] = quantization_report(sam)
    sam.to(device)
    disable_all(sam)
    _calibrate(seg, samples, boxed, qcfg, info, timer, device, log)
    info["recon_units"] = n_units
    info["pre_recon_phases_s"] = dict(timer.times)
    if checkpoint is not None and qcfg.recon.iters > 0:
        checkpoint.save(sam, 0, n_units, info, [], global_rng())
    return Calibrated(info, timer, quant_encoder)


def reconstruct_segmenter(seg, samples: List[CalibSample], qcfg: QConfig, device, cal: Calibrated,
                          paper_eval_bugs: bool = False, checkpoint: Optional[ReconCheckpoint] = None) -> Dict:
    """Reconstruct the calibrated ``seg.sam`` (seeded by ``qcfg.seed``) and put it in its evaluation state; returns
    the run's info. ``cal``: :func:`calibrate_segmenter`'s record of this model (or of the model it was copied
    from: pass ``copy.deepcopy(cal)`` with a ``copy.deepcopy`` of the model)."""
    sam, info, timer, saved = seg.sam, cal.info, cal.timer, cal.saved
    stages = recon_stages(sam, cal.quant_encoder, qcfg.recon.units)
    n_units = sum(len(u) for _, u in stages)
    info["seed"] = qcfg.seed
    with timer.phase("reconstruction"):
        if qcfg.recon.iters > 0:
            save = None
            if checkpoint is not None:
                def save(records, rng):
                    checkpoint.save(sam, len(records), n_units, info, records, rng)
            info["recon"] = reconstruct(seg, samples, stages, qcfg.recon, qcfg.seed, device, paper_bugs=paper_eval_bugs,
                                        done=saved["recon"] if saved else None, rng=saved["rng"] if saved else None,
                                        on_unit=save)
    info["reconstruction_s"] = timer.times["reconstruction"]
    info["ptq_phases_s"] = dict(timer.times)
    if checkpoint is not None:  # included in the phases above; shown apart to see what crash safety costs
        info["ptq_phases_s"]["recon_state_saves"] = round(checkpoint.save_s, 2)
    finalize(sam, qcfg, info, paper_eval_bugs)
    return info


def finalize(sam, qcfg: QConfig, info: Dict, paper_eval_bugs: bool = False) -> None:
    """The evaluation state: every quantizer on at drop probability 1 and every AdaRound layer hardened (unless
    ``paper_eval_bugs``: the paper code's two leaks), the constants frozen; counts recorded in ``info``."""
    enable_quantization(sam)
    set_drop_prob(sam, 1.0)
    if paper_eval_bugs:  # the paper's evaluation: layer inputs left at the drop probability, later units soft
        set_drop_prob(sam, qcfg.recon.drop_prob, only_layer_inputs=True)
        if qcfg.recon.iters == 0:
            harden_all(sam)
    else:
        harden_all(sam)
    info["adaround_hardened"] = count_hard(sam)
    info["adaround_layers"] = sum(1 for q in sam.modules() if isinstance(q, AdaRoundFakeQuantize))
    info["paper_eval_bugs"] = paper_eval_bugs
    info["num_quantizers"] = sum(1 for q in sam.modules() if isinstance(q, FakeQuantizeBase) and q.fake_quant_enabled)
    freeze(sam)


def _calibrate(seg, samples, boxed, qcfg: QConfig, info: Dict, timer: PhaseTimer, device, log) -> None:
    """Activation / weight calibration, BIG and AGQ (everything before reconstruction); records into ``info``."""
    sam = seg.sam
    pt = qcfg.ptq4sam
    dec_atts = [a for a in quant_attentions(sam.mask_decoder) if isinstance(a, QuantDecoderAttention)]
    # calibration runs the encoder once per image: its activation observers see it (float data) and its output is
    # kept, so BIG's recording and the decoder's calibration run the decoder only (same data as full forwards)
    with timer.phase("calibration"):
        enable_calibration(sam.image_encoder)
        with torch.no_grad():
            feats = [seg.encode(s.image)[0] for s in _progress(samples, desc="calibration: encoder")]
        disable_all(sam)
    box_feats = [f for s, f in zip(samples, feats) if has_boxes(s)]
    if pt.BIG:
        with timer.phase("big"):
            targets = [a for a in dec_atts if any(a.role.endswith(r) for r in pt.big_layers)]
            first = pt.big_sample == "first_prompt"  # the paper tests the first image only
            k_posts = record(seg, boxed[:1] if first else boxed, targets, ["k_post"], desc="BIG: post-k_proj",
                             rows_per_image=None if first else 4096, feats=box_feats[:1] if first else box_feats)
            info["big"] = big_mod.apply_big(targets, {i: r["k_post"] for i, r in k_posts.items()},
                                            pt.global_num, pt.peak_distance, pt.peak_height, sample=pt.big_sample,
                                            bw_rule=pt.big_bandwidth)
            del k_posts
        flipped = [e["layer"] for e in info["big"] if e["bimodal"]]
        log(f"BIG: bimodal and flipped: {flipped or 'none'} (of {[e['layer'] for e in info['big']]})")
    with timer.phase("calibration"):  # weights (after BIG's folds), then the decoder on the kept image embeddings
        for m in quantized_layers(sam):
            m.calibrate_weight()
        enable_calibration(sam)
        disable_all(sam.image_encoder)
        with torch.no_grad():
            for s, f in zip(_progress(boxed, desc="calibration: decoder"), box_feats):
                forward_sample(seg, s, f)
        del feats, box_feats
        uncalibrated = []
        for q in act_quantizers(sam):
            if q.observer.num_batches > 0:
                q.init_from_observer()
            else:
                uncalibrated.append(type(q).__name__)
        disable_all(sam)
    if uncalibrated:
        log(f"warning: {len(uncalibrated)} activation quantizer(s) saw no calibration data and stay float")
    info["uncalibrated_quantizers"] = len(uncalibrated)
    info["calibration_s"] = round(timer.times.get("big", 0) + timer.times["calibration"], 2)  # as before: with BIG
    if qcfg.gptq.enabled:
        with timer.phase("gptq"):
            def run():  # on the calibration images (decoder where boxes), every weight float
                if qcfg.gptq.inputs == "quantized":  # activation quantizers on (the Hessians of quantized inputs)
                    enable_quantization(sam, weights=False)
                for s in _progress(samples, desc="GPTQ: input Hessians"):
                    forward_sample(seg, s)
                disable_all(sam)
            info["gptq"] = gptq_mod.apply_gptq(sam, run, qcfg.gptq.damp, qcfg.gptq.act_order, progress=_progress)
        g = info["gptq"]
        log(f"GPTQ: {g['layers']} layers in {g['seconds']} s, median proxy loss GPTQ / round-to-nearest "
            f"{g['proxy_ratio_median']}; not supported (round-to-nearest): {g['not_supported'] or 'none'}")
    if pt.AGQ:
        with timer.phase("agq"):
            info["agq"] = _agq(seg, sam, boxed, pt, device)
        info["agq_search_s"] = timer.times["agq"]
        log(f"AGQ: tau per attention {[e['tau'] for e in info['agq']]}")


def _agq(seg, sam, samples, pt, device) -> List[Dict]:
    """Choose tau and s of every AGQ quantizer (the paper's per-image search or the former grid)."""
    atts = [a for a in quant_attentions(sam) if a.uses_agq]
    use = samples[: pt.agq_images] if pt.agq_images else samples
    out = []
    if pt.agq_search == "paper":
        searches = {id(a): agq_mod.PaperAGQSearch(a.attn_quant.quantizer.bit, pt.taus, pt.p,
                                                  a.attn_quant.quantizer.levels_mode) for a in atts}

        def each(cur):  # one image at a time: its softmax maps are searched, then dropped
            for aid, rec in cur.items():
                if "attn" in rec:
                    searches[aid].add(rec["attn"], rec["v"])
        record(seg, use, atts, ["attn", "v"], desc="AGQ: per-image search", each=each)
        results = {id(a): searches[id(a)].result() for a in atts}
    else:
        recs = record(seg, use, atts, ["attn", "v"], desc="AGQ: softmax")
        results = {id(a): agq_mod.search_tau(list(zip(recs[id(a)]["attn"], recs[id(a)]["v"])),
                                             a.attn_quant.quantizer.bit, pt.taus, pt.scale_ratios, pt.p,
                                             a.attn_quant.quantizer.levels_mode)
                   for a in atts}
        del recs
    for a in atts:
        res = results[id(a)]
        q: AGQFakeQuantize = a.attn_quant.quantizer
        q.tau = res["tau"]
        q.set_qparams(torch.tensor([res["scale"]], device=device), torch.zeros(1, device=device))
        q.initialized = True
        out.append({"layer": getattr(a, "role", type(a).__name__), **res})
    return out

