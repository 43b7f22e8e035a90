"""The PTQ pipeline on a BoxPromptSegmenter (torch only): smoothing, convert, calibrate (BIG, GPTQ, AGQ),
reconstruct, finalise for evaluation. Each step is its own function, so a caller can calibrate once and reconstruct
with several seeds (the calibration does not depend on the seed)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import torch

from . import methods
from .checkpoint import ReconCheckpoint, restore_quant_state
from .errors import InputError
from .methods import CalibrationJob
from .progress import PhaseTimer
from .progress import progress as _progress
from .qconfig import QConfig
from .quant_sam import build_context, quantization_report, quantize_sam, recon_stages
from .quantization import (
    AdaRoundFakeQuantize,
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
from .samples import CalibSample, act_quantizers, forward_sample, has_boxes, quantized_layers


# ---- the whole pipeline ---------------------------------------------------------------------------------------
@dataclass
class QuantInfo:
    """What a quantization did, for metrics.json (:meth:`to_dict`) and the resume state: the pipeline's counts and
    times, and each method's report under its name (``methods``: e.g. ``big``, ``gptq``, ``agq``, ``smooth``)."""

    calib_images: int = 0
    calib_images_without_boxes: int = 0
    layers: Dict[str, List[str]] = field(default_factory=dict)  # Linear / Conv layers quantized and left float
    uncalibrated_quantizers: int = 0
    calibration_s: float = 0.0  # activation + weight calibration (with BIG's recording)
    agq_search_s: Optional[float] = None
    recon_units: int = 0
    pre_recon_phases_s: Dict[str, float] = field(default_factory=dict)
    seed: Optional[int] = None  # the seed reconstruction used
    recon: Optional[List[Dict]] = None  # one record per reconstruction unit (None: no reconstruction)
    reconstruction_s: float = 0.0
    ptq_phases_s: Dict[str, float] = field(default_factory=dict)
    resumed_after_unit: Optional[int] = None
    adaround_hardened: int = 0
    adaround_layers: int = 0
    paper_eval_bugs: bool = False
    num_quantizers: int = 0  # quantizers on at evaluation
    methods: Dict[str, Any] = field(default_factory=dict)  # method name -> its report

    def to_dict(self) -> Dict[str, Any]:
        """The flat form of metrics.json (method reports at the top level); fields that do not apply are left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "methods"}
        out = {k: v for k, v in out.items() if v is not None}
        return {**out, **self.methods}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QuantInfo":
        names = {f.name for f in fields(cls)} - {"methods"}
        return cls(**{k: v for k, v in d.items() if k in names}, methods={k: v for k, v in d.items() if k not in names})


@dataclass
class Calibrated:
    """A calibrated model's record between calibration and reconstruction: what happened so far (``info``), the
    phase times, and the state to resume from (``saved``: a :class:`ReconCheckpoint` state, or None)."""

    info: QuantInfo
    timer: PhaseTimer
    quant_encoder: bool
    saved: Optional[Dict] = None
    # the float image encoder's output per calibration image with boxes (index in the samples), kept from calibration
    # so that the reconstruction of a decoder-only run does not encode them again; None when the encoder is quantized
    embeddings: Optional[Dict[int, torch.Tensor]] = None


def quantize_segmenter(seg, samples: List[CalibSample], qcfg: QConfig, quant_encoder: bool, device,
                       paper_eval_bugs: bool = False, log=print, checkpoint: Optional[ReconCheckpoint] = None) -> QuantInfo:
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
    info = QuantInfo()
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
    job = CalibrationJob(seg, samples, boxed, qcfg, quant_encoder, device, log, info)
    # on the float model (on --resume too: deterministic, and the saved state's weights replace them anyway)
    _method_step("before_convert", job, timer)
    ctx = build_context(qcfg)
    quantize_sam(sam, ctx, quant_encoder, float_modules=tuple(qcfg.float_modules))
    n_units = sum(len(u) for _, u in _recon_stages(sam, qcfg, quant_encoder))
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:  # --resume: calibration, BIG and AGQ are in the saved state
        restore_quant_state(sam, saved, checkpoint.path)
        sam.to(device)
        info = QuantInfo.from_dict(saved["info"])
        info.resumed_after_unit = saved["units_done"]
        for k, v in info.pre_recon_phases_s.items():  # the interrupted run's calibration, BIG, GPTQ, AGQ
            timer.add(k, v)
        log(f"--resume: {checkpoint.path}: calibration done, {saved['units_done']} of {n_units} reconstruction units "
            "done; continuing")
        return Calibrated(info, timer, quant_encoder, saved)
    info.calib_images, info.calib_images_without_boxes = len(samples), len(samples) - len(boxed)
    info.layers = quantization_report(sam)
    sam.to(device)
    disable_all(sam)
    _calibrate(job, timer)
    info.recon_units = n_units
    info.pre_recon_phases_s = dict(timer.times)
    if checkpoint is not None and qcfg.recon.iters > 0:
        checkpoint.save(sam, 0, n_units, info.to_dict(), [], global_rng())
    return Calibrated(info, timer, quant_encoder, embeddings=job.float_embeddings)


def reconstruct_segmenter(seg, samples: List[CalibSample], qcfg: QConfig, device, cal: Calibrated,
                          paper_eval_bugs: bool = False, checkpoint: Optional[ReconCheckpoint] = None) -> QuantInfo:
    """Reconstruct the calibrated ``seg.sam`` (seeded by ``qcfg.seed``) and put it in its evaluation state; returns
    the run's info. ``cal``: :func:`calibrate_segmenter`'s record of this model (or of the model it was copied
    from: pass ``copy.deepcopy(cal)`` with a ``copy.deepcopy`` of the model)."""
    sam, info, timer, saved = seg.sam, cal.info, cal.timer, cal.saved
    stages = _recon_stages(sam, qcfg, cal.quant_encoder)
    objectives = [o for m, sec in methods.active(qcfg) if (o := m.recon_objective(sec, seg, samples, qcfg.seed))]
    if len(objectives) > 1:
        raise InputError(f"{len(objectives)} active methods change the reconstruction loss; at most one can")
    n_units = sum(len(u) for _, u in stages)
    info.seed = qcfg.seed
    with timer.phase("reconstruction"):
        if qcfg.recon.iters > 0:
            save = None
            if checkpoint is not None:
                def save(records, rng):
                    checkpoint.save(sam, len(records), n_units, info.to_dict(), records, rng)
            info.recon = reconstruct(seg, samples, stages, qcfg.recon, qcfg.seed, device, paper_bugs=paper_eval_bugs,
                                        done=saved["recon"] if saved else None, rng=saved["rng"] if saved else None,
                                        on_unit=save, embeddings=cal.embeddings,
                                        objective=objectives[0] if objectives else None)
    cal.embeddings = None
    info.reconstruction_s = timer.times["reconstruction"]
    info.ptq_phases_s = dict(timer.times)
    if checkpoint is not None:  # included in the phases above; shown apart to see what crash safety costs
        info.ptq_phases_s["recon_state_saves"] = round(checkpoint.save_s, 2)
    finalize(sam, qcfg, info, paper_eval_bugs)
    return info


def _recon_stages(sam, qcfg: QConfig, quant_encoder: bool):
    """[(stage, units)] of the reconstruction: ``recon.units``' default, or an active method's own (e.g. PAR's)."""
    stages = recon_stages(sam, quant_encoder, qcfg.recon.units)
    for method, sec in methods.active(qcfg):
        stages = method.recon_stages(sec, sam, quant_encoder, stages)
    return stages


def finalize(sam, qcfg: QConfig, info: QuantInfo, paper_eval_bugs: bool = False) -> None:
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
    info.adaround_hardened = count_hard(sam)
    info.adaround_layers = sum(1 for q in sam.modules() if isinstance(q, AdaRoundFakeQuantize))
    info.paper_eval_bugs = paper_eval_bugs
    info.num_quantizers = sum(1 for q in sam.modules() if isinstance(q, FakeQuantizeBase) and q.fake_quant_enabled)
    freeze(sam)


def _method_step(hook: str, job: CalibrationJob, timer: PhaseTimer) -> None:
    """Each active method's step ``hook`` in registry order, timed as the phase of the method's name; a step that
    returns a report puts it in ``job.info.methods[method.name]`` (a method without this step returns None)."""
    for method, sec in methods.active(job.qcfg):
        before = timer.times.get(method.name)
        with timer.phase(method.name):
            report = getattr(method, hook)(sec, job)
        if report is not None:
            job.info.methods[method.name] = report
        elif before is None:
            timer.times.pop(method.name, None)
        else:
            timer.times[method.name] = before


def _calibrate(job: CalibrationJob, timer: PhaseTimer) -> None:
    """Activation / weight calibration and the methods' calibration steps (everything before reconstruction):
    encoder activations, then each active method's ``after_encoder`` (e.g. BIG), the decoder's activations, each
    method's ``before_weights`` (e.g. ACNR), the weights, then each method's ``after_calibration`` (e.g. GPTQ, AGQ);
    reports into ``job.info``. Weights are off while activations are observed, so their order does not matter."""
    seg, sam, info = job.seg, job.seg.sam, job.info
    # calibration runs the encoder once per image: its activation observers see it (float data) and its output is
    # kept, so BIG's recording and the decoder's calibration run the decoder only (same data as full forwards)
    with timer.phase("calibration"):
        enable_calibration(sam.image_encoder)
        with torch.no_grad():
            feats = [seg.encode(s.image)[0] for s in _progress(job.samples, desc="calibration: encoder")]
        disable_all(sam)
    job.box_feats = [f for s, f in zip(job.samples, feats) if has_boxes(s)]
    if not any(isinstance(m, FakeQuantizeBase) for m in sam.image_encoder.modules()):  # float encoder: outputs final
        job.float_embeddings = {i: f for i, (s, f) in enumerate(zip(job.samples, feats)) if has_boxes(s)}
    del feats
    _method_step("after_encoder", job, timer)
    with timer.phase("calibration"):  # the decoder's activations on the kept image embeddings
        enable_calibration(sam)
        disable_all(sam.image_encoder)
        with torch.no_grad():
            for s, f in zip(_progress(job.boxed, desc="calibration: decoder"), job.box_feats):
                forward_sample(seg, s, f)
        job.box_feats = []
        uncalibrated = []
        for q in act_quantizers(sam):
            if q.observer.num_batches > 0:
                q.init_from_observer()
            else:
                uncalibrated.append(type(q).__name__)
        disable_all(sam)
    _method_step("before_weights", job, timer)
    with timer.phase("calibration"):  # the weights (after BIG's folds and ACNR's weights), each observed once
        for m in quantized_layers(sam):
            m.calibrate_weight()
    if uncalibrated:
        job.log(f"warning: {len(uncalibrated)} activation quantizer(s) saw no calibration data and stay float")
    info.uncalibrated_quantizers = len(uncalibrated)
    info.calibration_s = round(timer.times.get("big", 0) + timer.times["calibration"], 2)  # as before: with BIG
    _method_step("after_calibration", job, timer)
    if "agq" in timer.times:
        info.agq_search_s = timer.times["agq"]
