"""The PTQ pipeline on a BoxPromptSegmenter (torch only): convert, BIG, calibrate, AGQ, reconstruct, finalise.

Calibration data is a list of ``CalibSample(image RGB uint8, boxes (N,4) xyxy)``; where the boxes come from
(GT, detector, JSON) is the caller's business.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import agq as agq_mod
from . import big as big_mod
from . import gptq as gptq_mod
from . import smooth as smooth_mod
from .errors import InputError, atomic_write
from .models.sam_builder import CheckpointError, load_state_dict_strict, load_weights_file
from .progress import PhaseTimer
from .progress import progress as _progress
from .qconfig import QConfig
from .quant_sam import (
    QuantContext,
    QuantDecoderAttention,
    quant_attentions,
    quantization_report,
    quantize_sam,
    recon_stages,
)
from .quantization import (
    AdaRoundFakeQuantize,
    AGQFakeQuantize,
    FakeQuantizeBase,
    QuantizerConfig,
    disable_all,
    enable_calibration,
    enable_quantization,
    freeze,
    harden_all,
    set_drop_prob,
)
from .quantization.fake_quant import qdrop_mask
from .quantization.qmodules import _QuantWeightMixin
from .quantization.state import count_hard, quant_meta, restore_quantizers


@dataclass
class CalibSample:
    image: np.ndarray
    boxes: np.ndarray


def gt_box_samples(ann: dict, img_dir, n: Optional[int]) -> List[CalibSample]:
    """The first ``n`` images by id of a COCO annotation dict (``coco_eval.load_ann``) with their GT boxes (xyxy), as
    calibration samples: the benchmarks' calibration set."""
    from . import coco_eval  # noqa: PLC0415

    prompts = coco_eval.gt_prompts(ann)
    return [CalibSample(coco_eval.read_rgb(Path(img_dir) / im["file_name"]), prompts[im["id"]][0])
            for im in coco_eval.first_images(ann, n)]


def forward_sample(seg, sample: CalibSample, feats: Optional[torch.Tensor] = None):
    """Encoder (unless its output ``feats`` is given) + decoder on the sample's boxes."""
    if feats is None:
        feats, _, original_size = seg.encode(sample.image)
    else:
        original_size = tuple(sample.image.shape[:2])
    boxes = torch.as_tensor(np.asarray(sample.boxes, np.float32).reshape(-1, 4))
    if boxes.shape[0] == 0:
        return feats
    return seg.decode(feats, boxes, original_size)


def build_context(qcfg: QConfig) -> QuantContext:
    wkw = {"round_mode": qcfg.recon.round_mode} if qcfg.w_qconfig.quantizer == "AdaRoundFakeQuantize" else {}
    a = qcfg.ahcptq
    hluq = None
    if a.HLUQ and qcfg.a_qconfig.bit is not None:
        hluq = QuantizerConfig("HLUQFakeQuantize", "HybridRangeObserver", qcfg.a_qconfig.bit, False, -1,
                               observer_kwargs={"range_rates": list(a.range_rates), "grid_rates": list(a.grid_rates),
                                                "top_rates": list(a.top_rates), "groups": a.hluq_groups})
    return QuantContext(w_cfg=qcfg.w_qconfig.to_quantizer_config(**wkw), a_cfg=qcfg.a_qconfig.to_quantizer_config(),
                        agq=qcfg.ptq4sam.AGQ and qcfg.a_qconfig.bit is not None, agq_levels=qcfg.ptq4sam.agq_levels,
                        big=qcfg.ptq4sam.BIG,
                        dw_act_per_channel=qcfg.depthwise_act_per_channel,
                        big_k_observer=qcfg.ptq4sam.big_k_observer, hluq_cfg=hluq,
                        cag_groups=a.groups if a.CAG else 0, cag_observer=a.cag_observer,
                        ahcptq_convs=a.convs,
                        overrides=list(qcfg.overrides))


def quantized_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, _QuantWeightMixin)]


def act_quantizers(model: nn.Module):
    return [q for q in model.modules() if isinstance(q, FakeQuantizeBase) and not q.is_weight]


@torch.no_grad()
def record(seg, samples, attentions, keys, desc="record", rows_per_image: Optional[int] = None, feats=None,
           each: Optional[Callable[[Dict[int, Dict[str, torch.Tensor]]], None]] = None):
    """Run float forwards and collect ``keys`` ('k_post', 'attn', 'v') from each attention: per attention id and key,
    one tensor per sample (the sample's calls concatenated along dim 0, i.e. all its prompts).

    ``feats``: the samples' image embeddings (runs the decoder only). ``rows_per_image``: keep a seeded random subset
    of that many token rows per sample (rows drawn at random, not strided: a stride aliases with the token layout).
    ``each``: called with every sample's record instead of keeping them all (bounded memory)."""
    out: Dict[int, Dict[str, List[torch.Tensor]]] = {id(a): {k: [] for k in keys} for a in attentions}
    gen = torch.Generator().manual_seed(0)
    try:
        for i, s in enumerate(_progress(samples, desc=desc)):
            for a in attentions:
                a.record = {k: [] for k in keys}
            forward_sample(seg, s, None if feats is None else feats[i])
            cur = {id(a): {k: torch.cat(a.record[k]) for k in keys if a.record[k]} for a in attentions}
            if rows_per_image:
                for rec in cur.values():
                    for k, t in rec.items():
                        rows = t.reshape(-1, t.shape[-1])
                        if rows.shape[0] > rows_per_image:
                            sel = torch.randperm(rows.shape[0], generator=gen)[:rows_per_image].to(rows.device)
                            rows = rows.index_select(0, sel)
                        rec[k] = rows
            if each is not None:
                each(cur)
            else:
                for aid, rec in cur.items():
                    for k, t in rec.items():
                        out[aid][k].append(t)
    finally:
        for a in attentions:
            a.record = None
    return out


# ---- reconstruction --------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _map_tensors(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _zip_tensors(a, b, fn):
    if torch.is_tensor(a):
        return fn(a, b)
    if isinstance(a, (list, tuple)):
        return type(a)(_zip_tensors(x, y, fn) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: _zip_tensors(a[k], b[k], fn) for k in a}
    return a


def _flat(obj) -> List[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat(o)]
    return []


class UnitCache:
    """Cached inputs/outputs of the current stage and output stubs of earlier ones (so a forward skips them).

    Samples are addressed by their index in the calibration list (decoder stages skip images without boxes)."""

    def __init__(self, stages, storage: torch.device, compute: torch.device, seed: int):
        self.stages, self.storage, self.compute = stages, storage, compute
        # QDrop masks are drawn on the compute device (seeded): no host->device copy per step
        self.mask_gen = torch.Generator(device=compute).manual_seed(seed)
        self.shapes: Dict[int, Dict[int, Any]] = {}  # stage -> sample -> output (as zeros on 'meta' for shape)
        self.prev_out: Dict[str, Dict[int, Any]] = {}  # 'fp' / 'quant' -> previous stage's outputs per sample
        self._cur = 0

    def store(self, x):
        return _map_tensors(x, lambda t: t.detach().to(self.storage))

    def load(self, x):
        return _map_tensors(x, lambda t: t.to(self.compute))

    def _grabber(self, captured: List[Any]):
        """A forward that stores its inputs (args, kwargs) in ``captured`` and stops the forward pass."""
        def grab(*args, **kwargs):
            captured.append(self.store((args, kwargs)))
            raise _Stop
        return grab

    def capture_inputs(self, seg, samples, idx: List[int], i: int, mode: str):
        """Inputs (args, kwargs) of stage i for the samples ``idx``, with earlier stages replaced by stubs."""
        captured: List[Any] = []
        stage = self.stages[i]
        grab = self._grabber(captured)

        stubs = {}
        for j in range(i):
            if j == i - 1 and mode in self.prev_out:
                outs = self.prev_out[mode]
                stubs[j] = lambda *a, _o=outs, **k: self.load(_o[self._cur])
            else:
                shp = self.shapes[j]
                stubs[j] = lambda *a, _s=shp, **k: _map_tensors(_s[self._cur], lambda t: torch.zeros(
                    t.shape, dtype=t.dtype, device=self.compute))
        try:
            for j, fn in stubs.items():
                self.stages[j].forward = fn
            stage.forward = grab
            with torch.no_grad():
                for self._cur in idx:
                    try:
                        forward_sample(seg, samples[self._cur])
                    except _Stop:
                        continue
                    raise RuntimeError(f"stage {i} ({type(stage).__name__}) was not reached in the forward of "
                                       f"calibration sample {self._cur}")
        finally:
            for j in list(stubs) + [i]:
                self.stages[j].__dict__.pop("forward", None)
        return captured

    def capture_within(self, stage: nn.Module, unit: nn.Module, stage_inputs):
        """Inputs of ``unit`` (a module inside ``stage``) from the stage's cached inputs, in the current state."""
        captured: List[Any] = []
        unit.forward = self._grabber(captured)
        try:
            with torch.no_grad():
                for args, kwargs in stage_inputs:
                    a, k = self.load((args, kwargs))
                    try:
                        stage(*a, **k)
                    except _Stop:
                        continue
                    raise RuntimeError(f"{type(unit).__name__} was not reached in {type(stage).__name__}")
        finally:
            unit.__dict__.pop("forward", None)
        return captured

    @torch.no_grad()
    def run(self, module: nn.Module, inputs):
        outs = []
        for args, kwargs in inputs:
            a, k = self.load((args, kwargs))
            outs.append(self.store(module(*a, **k)))
        return outs

    def finish_stage(self, i, idx: List[int], fp_out, quant_out):
        self.shapes[i] = {j: _map_tensors(o, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))
                          for j, o in zip(idx, fp_out)}
        self.prev_out = {"fp": dict(zip(idx, fp_out)), "quant": dict(zip(idx, quant_out))}


LOSS_REDUCTIONS = ("paper", "mean")
B_DECAYS = ("linear", "cosine")


def lp_loss(pred, tgt, p=2.0, reduction: str = "paper"):
    """Reconstruction loss. ``'paper'``: ``|pred - tgt|^p`` summed over dim 1 (tokens / channels), averaged over the
    rest, as the paper's code; ``'mean'``: averaged over every element (this toolkit before; 7x-4096x weaker beside
    AdaRound's summed regulariser, depending on dim 1)."""
    d = (pred - tgt).abs().pow(p)
    if reduction == "paper" and d.dim() > 1:
        return d.sum(1).mean()
    return d.mean()


def temperature(it: int, iters: int, warm_up: float, b_range, mode: str = "linear") -> Optional[float]:
    """AdaRound's annealed exponent b at step ``it`` (0-based), or None during the warm-up (no rounding loss).

    ``'linear'``: the paper's ``LinearTempDecay`` (its step counter starts at 1; b falls linearly from b_range[0] to
    b_range[1] between warm_up * iters and iters). ``'cosine'``: this toolkit's former schedule."""
    b_hi, b_lo = b_range
    if mode == "linear":
        t, start = it + 1, warm_up * iters
        if t < start:
            return None
        rel = (t - start) / max(1e-12, iters - start)
        return b_lo + (b_hi - b_lo) * max(0.0, 1.0 - rel)
    warm = int(warm_up * iters)
    if it < warm:
        return None
    return b_lo + 0.5 * (b_hi - b_lo) * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm)))


def _grad_norm(grads) -> float:
    return math.sqrt(sum(float(g.detach().pow(2).sum()) for g in grads if g is not None))


def reconstruct_unit(unit: nn.Module, quant_in, fp_in, fp_out, cache: UnitCache, recon, gen: torch.Generator,
                     desc: str) -> Dict:
    adarounds = [q for q in unit.modules() if isinstance(q, AdaRoundFakeQuantize) and q.learnable
                 and q.fake_quant_enabled]
    learning = [q for q in unit.modules() if isinstance(q, FakeQuantizeBase) and not q.is_weight
                and q.learnable and q.fake_quant_enabled]
    scales = [s for q in learning for s in q.learnable_params()]
    offsets = [z for q in learning for z in q.learnable_offsets()]  # LSQ+'s zero points (linear space)
    if recon.scale_lr == 0:  # activation ranges stay as calibrated (no optimizer, no gradients for them)
        scales, offsets = [], []
    for q in unit.modules():  # parameters not learned here need no gradient (the quantizers then run fused)
        if isinstance(q, FakeQuantizeBase) and not q.is_weight:
            for t in (q.scale, q.zero_point, *q.learnable_params(), *q.learnable_offsets()):
                t.requires_grad_(False)
    iters = recon.iters
    t_start = time.time()
    info = {"unit": desc, "adaround_layers": len(adarounds), "act_scales": len(scales), "act_offsets": len(offsets)}
    if iters == 0 or (not adarounds and not scales and not offsets):
        return info
    set_drop_prob(unit, recon.drop_prob)
    opts, scheds = [], []
    if adarounds:
        opts.append(torch.optim.Adam([q.alpha for q in adarounds], lr=recon.round_lr))
    log_scales = []
    if scales and recon.scale_space == "log":  # Adam on log(s): each step is relative to its scale
        log_scales = [nn.Parameter(s.detach().abs().clamp(min=1e-8).log()) for s in scales]
    if scales or offsets:
        o = torch.optim.Adam((log_scales or scales) + offsets, lr=recon.scale_lr)
        opts.append(o)
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=iters, eta_min=0.0))
    for p in adarounds:
        p.alpha.requires_grad_(True)
    for s in scales + offsets:
        s.requires_grad_(True)
    n = len(quant_in)
    first = last = None
    g_rec = g_round = None
    bar = _progress(range(iters), desc=desc, leave=False)

    def mix(q, f):  # QDrop: mix quantized and float unit inputs elementwise
        if not q.is_floating_point() or q.shape != f.shape:
            return q
        return torch.where(qdrop_mask(q.shape, recon.drop_prob, cache.mask_gen, q.device), q, f)

    for it in bar:
        rec = 0.0
        for _ in range(recon.batch_size):  # images per step (their box counts differ: accumulate, not stack)
            idx = int(torch.randint(n, (1,), generator=gen))
            (qa, qk), (fa, fk), tgt = cache.load(quant_in[idx]), cache.load(fp_in[idx]), cache.load(fp_out[idx])
            n_box = {t.shape[0] for t in _flat([qa, list(qk.values()), tgt])}
            if recon.max_boxes and len(n_box) == 1 and n_box.pop() > recon.max_boxes:
                # prompts are independent in the decoder: a random subset of them is an unbiased smaller batch
                sel = torch.randperm(_flat([qa, list(qk.values())])[0].shape[0], generator=gen)[: recon.max_boxes]
                pick = lambda t: t.index_select(0, sel.to(t.device))  # noqa: E731
                qa, qk, fa, fk, tgt = (_map_tensors(x, pick) for x in (qa, qk, fa, fk, tgt))
            if recon.drop_prob < 1.0:
                qa, qk = _zip_tensors(qa, fa, mix), _zip_tensors(qk, fk, mix)
            out = unit(*qa, **qk)
            rec = rec + sum(lp_loss(o, t, reduction=recon.loss) for o, t in zip(_flat(out), _flat(tgt))) \
                / recon.batch_size
        b = temperature(it, iters, recon.warm_up, recon.b_range, recon.b_decay) if adarounds else None
        if b is None:
            round_loss = torch.zeros((), device=rec.device)
        else:
            round_loss = recon.weight * sum(q.rounding_loss(b) for q in adarounds)
        loss = rec + round_loss
        for o in opts:
            o.zero_grad(set_to_none=True)
        log_now = it % 20 == 0 or it == iters - 1  # reading a loss syncs the device: only now and then
        alphas = [q.alpha for q in adarounds]
        if log_now and alphas and round_loss.requires_grad:  # the regulariser's gradient alone (cheap: no network)
            gr = torch.autograd.grad(round_loss, alphas, retain_graph=True)
        loss.backward()
        if log_now and alphas:  # the reconstruction term's gradient = total - regulariser's, on the rounding
            if round_loss.requires_grad:
                g_round = _grad_norm(gr)
                g_rec = _grad_norm([a.grad - g for a, g in zip(alphas, gr)])
            else:
                g_round, g_rec = 0.0, _grad_norm([a.grad for a in alphas])
        for ls, s in zip(log_scales, scales):  # s = sign * exp(ls): dL/dls = dL/ds * ds/dls = dL/ds * s
            ls.grad = None if s.grad is None else s.grad * s.detach()
        for o in opts:
            o.step()
        with torch.no_grad():
            for ls, s in zip(log_scales, scales):
                s.copy_(ls.exp() * torch.where(s < 0, -1.0, 1.0))
        for s in scheds:
            s.step()
        if first is None:
            first = float(rec.detach())
        if log_now:
            last = float(rec.detach())
            post = {"rec": f"{last:.3e}", "round": f"{float(round_loss.detach()):.2e}"}
            if g_rec is not None:
                post.update(g_rec=f"{g_rec:.1e}", g_round=f"{g_round:.1e}")
            bar.set_postfix(**post)
    for q in adarounds:
        q.alpha.requires_grad_(False)
    for s in scales + offsets:
        s.requires_grad_(False)
    set_drop_prob(unit, 1.0)
    info.update(first_rec_loss=first, last_rec_loss=last, optimize_s=round(time.time() - t_start, 2),
                iter_s=round((time.time() - t_start) / iters, 4))
    if g_rec is not None:  # gradient norms on the learned rounding at the last step, of each loss term
        info.update(grad_norm_rec=g_rec, grad_norm_round=g_round)
    return info


def _has_boxes(s: CalibSample) -> bool:
    return np.asarray(s.boxes).reshape(-1, 4).shape[0] > 0


def global_rng() -> Dict[str, Any]:
    """torch's global generator state(s), which QDrop inside a unit draws from."""
    out: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def reconstruct(seg, samples, stages, recon, seed: int, device, paper_bugs: bool = False,
                done: Optional[List[Dict]] = None, rng: Optional[Dict] = None,
                on_unit: Optional[Callable[[List[Dict], Dict], None]] = None) -> List[Dict]:
    """Reconstruct ``stages`` ([(stage, units)], :func:`quant_sam.recon_stages`) one unit at a time, in order.

    Decoder stages use the calibration images that have boxes. ``paper_bugs`` reproduces the paper code's leaks
    after each unit: only its first AdaRound layer is hardened (the others keep soft rounding) and its layer-input
    quantizers stay at the training drop probability (so later units and the evaluation see them).

    Resuming: ``done`` = the records of the units already reconstructed (their state is in the model) and ``rng`` the
    generators' states saved after the last of them; finished stages are replayed (forwards only) to rebuild the
    cached inputs. ``on_unit(records, rng)`` is called after every unit (to save the state)."""
    if done and paper_bugs:
        raise InputError("--resume cannot continue a --paper-eval-bugs run: its leaking QDrop layers draw from the "
                         "global random generator during the replayed forwards; rerun it from the start")
    storage = device if recon.keep_gpu else torch.device("cpu")
    cache = UnitCache([s for s, _ in stages], storage, device, seed)
    gen = torch.Generator().manual_seed(seed)
    if rng:  # the states after the last finished unit (the replayed forwards draw no random numbers)
        if "gen" in rng:  # absent when resuming before the first unit
            gen.set_state(rng["gen"])
            cache.mask_gen.set_state(rng["mask_gen"])
        torch.set_rng_state(rng["torch"])  # QDrop inside a unit draws from the global generator
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
    sam = seg.sam
    enc, dec = sam.image_encoder, sam.mask_decoder
    dec_ids = {id(m) for m in dec.modules()}
    all_idx = list(range(len(samples)))
    box_idx = [i for i in all_idx if _has_boxes(samples[i])]
    if not any(s is enc or id(s) in {id(m) for m in enc.modules()} for s, _ in stages):
        # float image encoder: compute each sample's embedding once and replay it in every capture pass
        disable_all(sam)
        with torch.no_grad():
            feats = {i: cache.store(seg.encode(samples[i].image)[0])
                     for i in _progress(box_idx, desc="image embeddings")}
        enc.forward = lambda *a, **k: cache.load(feats[cache._cur])
    leaky: List[FakeQuantizeBase] = []  # paper_bugs: layer-input quantizers left at the training drop probability

    def quant_state():
        enable_quantization(sam)
        set_drop_prob(sam, 1.0)
        for q in leaky:
            q.drop_prob = recon.drop_prob

    infos: List[Dict] = list(done or [])
    skip = len(infos)  # units finished before a resume
    n_units = sum(len(u) for _, u in stages)
    ticks = iter(_progress(range(skip, n_units), desc="reconstruction units"))  # one tick per unit
    u = 0  # units seen
    try:
        for i, (stage, units) in enumerate(stages):
            idx = box_idx if id(stage) in dec_ids else all_idx
            quant_state()
            q_stage_in = cache.capture_inputs(seg, samples, idx, i, "quant")
            disable_all(sam)
            f_stage_in = cache.capture_inputs(seg, samples, idx, i, "fp")
            trained = False
            for unit in units:
                u += 1
                if u <= skip:  # finished before the resume: its state is loaded
                    continue
                trained = True
                next(ticks, None)
                t_unit = time.time()
                if unit is stage:
                    quant_in, fp_in = q_stage_in, f_stage_in
                else:
                    quant_state()
                    quant_in = cache.capture_within(stage, unit, q_stage_in)
                    disable_all(sam)
                    fp_in = cache.capture_within(stage, unit, f_stage_in)
                disable_all(sam)
                fp_out = cache.run(unit, fp_in)
                quant_state()
                name = f"unit {len(infos) + 1}/{n_units} {type(unit).__name__}"
                with torch.enable_grad():
                    infos.append(reconstruct_unit(unit, quant_in, fp_in, fp_out, cache, recon, gen, name))
                ada = [q for q in unit.modules() if isinstance(q, AdaRoundFakeQuantize)]
                for q in ada[:1] if paper_bugs else ada:
                    q.harden()
                if paper_bugs:
                    leaky += [q for q in unit.modules() if isinstance(q, FakeQuantizeBase) and q.is_layer_input]
                quant_state()
                quant_out = cache.run(unit, quant_in)
                infos[-1]["final_rec_loss"] = float(np.mean([
                    sum(float(lp_loss(o, t, reduction=recon.loss)) for o, t in zip(_flat(q), _flat(f)))
                    for q, f in zip(quant_out, fp_out)]))
                infos[-1]["unit_s"] = round(time.time() - t_unit, 2)  # captures + optimisation + outputs
                if on_unit is not None:
                    on_unit(infos, {"gen": gen.get_state(), "mask_gen": cache.mask_gen.get_state(), **global_rng()})
            if units == [stage] and trained:
                f_stage_out, q_stage_out = fp_out, quant_out
            else:  # several units, or a stage finished before a resume (replayed: the same forwards)
                disable_all(sam)
                f_stage_out = cache.run(stage, f_stage_in)
                quant_state()
                q_stage_out = cache.run(stage, q_stage_in)
            cache.finish_stage(i, idx, f_stage_out, q_stage_out)
            del q_stage_in, f_stage_in
        for _ in ticks:  # closes the bar
            pass
    finally:
        enc.__dict__.pop("forward", None)
    return infos


# ---- the whole pipeline ---------------------------------------------------------------------------------------
def quantize_segmenter(seg, samples: List[CalibSample], qcfg: QConfig, quant_encoder: bool, device,
                       paper_eval_bugs: bool = False, log=print, checkpoint: Optional[ReconCheckpoint] = None) -> Dict:
    """Quantize ``seg.sam`` in place; returns what happened (for metrics.json).

    ``paper_eval_bugs`` reproduces the two leaks of the paper code's evaluation (see :func:`reconstruct`): layer
    inputs left at QDrop's drop probability and only the first AdaRound layer of each unit hardened.
    ``checkpoint``: save the state after calibration and after every reconstruction unit; with its ``resume`` set,
    continue from the state it holds (see :class:`ReconCheckpoint`)."""
    info: Dict[str, Any] = {}
    timer = PhaseTimer()
    sam = seg.sam
    boxed = [s for s in samples if _has_boxes(s)]
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
    stages = recon_stages(sam, quant_encoder, qcfg.recon.units)
    n_units = sum(len(u) for _, u in stages)
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
    else:
        info["calib_images"], info["calib_images_without_boxes"] = len(samples), len(samples) - len(boxed)
        info["layers"] = quantization_report(sam)
        sam.to(device)
        disable_all(sam)
        _calibrate(seg, samples, boxed, qcfg, info, timer, device, log)
        info["recon_units"] = n_units
        info["pre_recon_phases_s"] = dict(timer.times)
        if checkpoint is not None and qcfg.recon.iters > 0:
            checkpoint.save(sam, 0, n_units, info, [], global_rng())
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
    return info


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
    box_feats = [f for s, f in zip(samples, feats) if _has_boxes(s)]
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


# ---- save / load ----------------------------------------------------------------------------------------------
# q_config keys that decide which quantizers exist and what they compute: a checkpoint made with other values cannot be
# loaded into this model (recon / calibration keys only decide how the saved values were found)
STRUCTURAL_KEYS = ("a_qconfig", "w_qconfig", "float_modules", "depthwise_act_per_channel", "ptq4sam.BIG",
                   "ptq4sam.AGQ", "ptq4sam.agq_levels", "ptq4sam.big_k_observer", "recon.round_mode", "ahcptq.HLUQ", "ahcptq.CAG",
                   "ahcptq.groups", "ahcptq.cag_observer", "ahcptq.convs", "ahcptq.hluq_groups",
                   "overrides")


def quant_state(sam) -> Dict:
    """Everything that defines the quantized model: its state dict and each quantizer's switches."""
    return {"state_dict": sam.state_dict(), "quant_meta": quant_meta(sam)}


def save_quantized(sam, path, q_config: Dict, quant_encoder: bool, info: Optional[Dict] = None):
    """The compact integer checkpoint (:mod:`ptq4sam.deploy.compact`), written atomically; returns its sizes."""
    from .deploy import save_compact  # noqa: PLC0415

    return save_compact(sam, path, q_config, quant_encoder, info)


def _get(d: Dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def qconfig_differences(saved: Dict, current: Dict, keys=STRUCTURAL_KEYS) -> List[str]:
    """``key: saved -> current`` for each of ``keys`` (q_config dicts) whose value differs."""
    out = []
    for k in keys:
        a, b = _get(saved, k), _get(current, k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{kk}: {a.get(kk)!r} -> {b.get(kk)!r}" for kk in sorted(set(a) | set(b)) if a.get(kk) != b.get(kk)]
        elif a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def restore_quant_state(sam, ckpt: Dict, path) -> None:
    """Put a :func:`quant_state` into ``sam`` (converted with the same q_config); quantizers stay unfrozen."""
    state, meta = ckpt["state_dict"], ckpt["quant_meta"]
    mods = dict(sam.named_modules())
    have = {n for n, m in mods.items() if isinstance(m, FakeQuantizeBase)}
    missing, extra = sorted(set(meta) - have), sorted(have - set(meta))
    if missing or extra:
        raise CheckpointError(f"{path}: its quantizers do not match this model's (in the file only: {missing[:3]}, "
                              f"in the model only: {extra[:3]}); was it saved with another q_config or "
                              "--quant-encoder setting?")
    for name in meta:
        if f"{name}.alpha" in state:  # AdaRound's learned rounding (mid-reconstruction states keep it)
            mods[name].alpha = nn.Parameter(state[f"{name}.alpha"].clone(), requires_grad=False)
    restore_quantizers(sam, state, meta)
    load_state_dict_strict(sam, state, str(path))


def load_quantized(sam, path, device, qcfg: Optional[QConfig] = None, quant_encoder: Optional[bool] = None) -> Dict:
    """Restore a model saved by :func:`save_quantized` into ``sam`` already converted with the same q_config.

    Read with ``weights_only=True`` (a file needing pickled objects is refused, never executed); another format is
    refused. With ``qcfg`` / ``quant_encoder``, a checkpoint saved with other structural q_config values is refused
    naming them. Returns the saved run's info."""
    from .deploy.compact import read_compact  # noqa: PLC0415

    obj = read_compact(path)
    diffs = []
    if qcfg is not None:
        diffs = qconfig_differences(json.loads(obj["q_config"]), qcfg.to_dict())
    if quant_encoder is not None and obj["quant_encoder"] != quant_encoder:
        diffs.append(f"--quant-encoder: {obj['quant_encoder']} -> {quant_encoder}")
    if diffs:
        raise CheckpointError(f"{path} was saved with another quantization setting ({'; '.join(diffs)}; saved -> "
                              "given): load it with the q_config and flags it was made with")
    return _load_compact_into(sam, obj, path, device)


def _load_compact_into(sam, obj: Dict, path, device) -> Dict:
    """Load a read compact checkpoint into ``sam`` (converted with its q_config), move it, freeze it for evaluation."""
    from .deploy.compact import load_compact  # noqa: PLC0415

    info = load_compact(sam, obj, path)
    sam.to(device)
    freeze(sam)
    return info


def load_quantized_file(sam, path, device) -> Tuple[QConfig, bool, Dict]:
    """Convert the float ``sam`` with the q_config and flags a compact checkpoint was saved with, and load it.
    Returns (q_config, quant_encoder, the saved run's info)."""
    from .deploy.compact import read_compact  # noqa: PLC0415
    from .qconfig import qconfig_from_dict  # noqa: PLC0415

    obj = read_compact(path)
    qcfg = qconfig_from_dict(json.loads(obj["q_config"]), f"{path} (its q_config)")
    for p in sam.parameters():
        p.requires_grad_(False)
    quantize_sam(sam, build_context(qcfg), obj["quant_encoder"], float_modules=tuple(qcfg.float_modules))
    return qcfg, bool(obj["quant_encoder"]), _load_compact_into(sam, obj, path, device)


# ---- crash-safe reconstruction ---------------------------------------------------------------------------------
RUN_BOOKKEEPING = ("timings", "ptq_phases_s", "pre_recon_phases_s", "resumed_after_unit", "saved_to")


def without_wall_times(metrics: Dict) -> Dict:
    """A run's metrics / info without wall times and resume bookkeeping: what must be identical between an
    uninterrupted run and a resumed one (or two runs with the same seed)."""
    out = {k: v for k, v in metrics.items()
           if not (k.endswith("_s") or k.startswith("images_per_s") or k in RUN_BOOKKEEPING)}
    out["recon"] = [{k: v for k, v in u.items() if not k.endswith("_s")} for u in metrics.get("recon", [])]
    return out


RECON_STATE_FORMAT = "ptq4sam-recon-state-1"
CRASH_ENV = "PTQ4SAM_CRASH_AFTER_UNIT"  # testing hook: raise right after unit k's state is saved


class ReconCheckpoint:
    """The quantization state after calibration (unit 0) and after each finished reconstruction unit, written
    atomically to ``path``; :meth:`load` gives it back to ``--resume`` if ``fingerprint`` (q_config, calibration
    data, seed, flags) is the same. Resuming replays the finished stages' forwards (no optimisation) to rebuild the
    cached stage inputs, restores the reconstruction's random generators, and continues with the next unit: the result
    is bit-identical to an uninterrupted run (tested)."""

    def __init__(self, path, fingerprint: Dict, resume: bool = False, write: bool = True, log=print):
        self.path, self.fingerprint, self.resume, self.write, self.log = Path(path), fingerprint, resume, write, log
        crash = os.environ.get(CRASH_ENV)
        self.crash_after = int(crash) if crash else None
        self.save_s = 0.0  # time spent writing the state (reported in ptq_phases_s.recon_state_saves)

    def save(self, sam, units_done: int, n_units: int, info: Dict, recon_infos: List[Dict], rng: Dict) -> None:
        obj = {"format": RECON_STATE_FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
               "units_done": units_done, "n_units": n_units, "info": json.dumps(info),
               "recon": json.dumps(recon_infos), "rng": rng, **quant_state(sam)}
        if self.write:
            t = time.time()
            atomic_write(self.path, lambda tmp: torch.save(obj, tmp))
            self.save_s += time.time() - t
        if self.crash_after is not None and units_done >= self.crash_after:
            raise RuntimeError(f"simulated crash after reconstruction unit {units_done} ({CRASH_ENV})")

    def load(self) -> Optional[Dict]:
        if not self.resume:
            return None
        if not self.path.is_file():
            self.log(f"--resume: no saved state at {self.path}; starting from the beginning")
            return None
        ckpt = load_weights_file(self.path, "reconstruction state (--resume)")
        if not isinstance(ckpt, dict) or ckpt.get("format") != RECON_STATE_FORMAT:
            raise CheckpointError(f"{self.path}: not a reconstruction state of format {RECON_STATE_FORMAT!r} (found "
                                  f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
        saved = json.loads(ckpt["fingerprint"])
        diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self.fingerprint.items() if saved.get(k) != v]
        if diffs:
            raise CheckpointError(f"{self.path}: the interrupted run used other settings ({'; '.join(d[:200] for d in diffs)}; "
                                  "saved -> now): resume with the same config, q_config, options and seed, or delete "
                                  "the file to start over")
        ckpt["info"], ckpt["recon"] = json.loads(ckpt["info"]), json.loads(ckpt["recon"])
        return ckpt

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
