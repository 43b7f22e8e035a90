"""The PTQ pipeline on a BoxPromptSegmenter (torch only): convert, BIG, calibrate, AGQ, reconstruct, finalise.

Calibration data is a list of ``CalibSample(image RGB uint8, boxes (N,4) xyxy)``; where the boxes come from
(GT, detector, JSON) is the caller's business.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import agq as agq_mod
from . import big as big_mod
from .progress import PhaseTimer
from .progress import progress as _progress
from .qconfig import QConfig
from .quant_sam import QuantContext, QuantDecoderAttention, quant_attentions, quantize_sam, recon_units
from .quantization import (
    AdaRoundFakeQuantize,
    AGQFakeQuantize,
    FakeQuantizeBase,
    QuantConv2d,
    QuantLinear,
    disable_all,
    enable_calibration,
    enable_quantization,
    freeze,
    harden_all,
    set_drop_prob,
)
from .quantization.fake_quant import qdrop_mask


@dataclass
class CalibSample:
    image: np.ndarray
    boxes: np.ndarray


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
    return QuantContext(w_cfg=qcfg.w_qconfig.to_quantizer_config(**wkw), a_cfg=qcfg.a_qconfig.to_quantizer_config(),
                        agq=qcfg.ptq4sam.AGQ and qcfg.a_qconfig.bit is not None, big=qcfg.ptq4sam.BIG,
                        dw_act_per_channel=qcfg.depthwise_act_per_channel)


def quantized_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def act_quantizers(model: nn.Module):
    return [q for q in model.modules() if isinstance(q, FakeQuantizeBase) and not q.is_weight]


@torch.no_grad()
def record(seg, samples, attentions, keys, desc="record", rows_per_image: Optional[int] = None, feats=None):
    """Run float forwards and collect ``keys`` ('k_post', 'attn', 'v') from each attention, per attention id
    (``feats``: the samples' image embeddings, to run the decoder only)."""
    for a in attentions:
        a.record = {k: [] for k in keys}
    try:
        for i, s in enumerate(_progress(samples, desc=desc)):
            forward_sample(seg, s, None if feats is None else feats[i])
    finally:
        out = {id(a): a.record for a in attentions}
        for a in attentions:
            a.record = None
    if rows_per_image:  # strided subsample of token rows per image (bounds memory for BIG's KDE)
        for rec in out.values():
            for k, lst in rec.items():
                rec[k] = [t.reshape(-1, t.shape[-1])[:: max(1, t.numel() // t.shape[-1] // rows_per_image)]
                          for t in lst]
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
    """Cached inputs/outputs of the current unit and output stubs of earlier ones (so a forward skips them)."""

    def __init__(self, units, storage: torch.device, compute: torch.device, seed: int):
        self.units, self.storage, self.compute = units, storage, compute
        # QDrop masks are drawn on the compute device (seeded): no host->device copy per step
        self.mask_gen = torch.Generator(device=compute).manual_seed(seed)
        self.shapes: Dict[int, List[Any]] = {}  # unit index -> per-sample output (as zeros on 'meta' for shape)
        self.prev_out: Dict[str, List[Any]] = {}  # 'fp' / 'quant' -> previous unit's outputs per sample

    def store(self, x):
        return _map_tensors(x, lambda t: t.detach().to(self.storage))

    def load(self, x):
        return _map_tensors(x, lambda t: t.to(self.compute))

    def capture_inputs(self, seg, samples, i: int, mode: str):
        """Inputs (args, kwargs) of unit i for every sample, with earlier units replaced by stubs."""
        captured = []
        unit = self.units[i]

        def grab(*args, **kwargs):
            captured.append(self.store((args, kwargs)))
            raise _Stop

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
                self.units[j].forward = fn
            unit.forward = grab
            with torch.no_grad():
                for self._cur, s in enumerate(samples):
                    try:
                        forward_sample(seg, s)
                    except _Stop:
                        continue
                    raise RuntimeError(f"unit {i} ({type(unit).__name__}) was not reached in the forward")
        finally:
            for j in list(stubs) + [i]:
                self.units[j].__dict__.pop("forward", None)
        return captured

    @torch.no_grad()
    def run_unit(self, i, inputs):
        outs = []
        for args, kwargs in inputs:
            a, k = self.load((args, kwargs))
            outs.append(self.store(self.units[i](*a, **k)))
        return outs

    def finish_unit(self, i, fp_out, quant_out):
        self.shapes[i] = [_map_tensors(o, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))
                          for o in fp_out]
        self.prev_out = {"fp": fp_out, "quant": quant_out}


def lp_loss(pred, tgt, p=2.0):
    return (pred - tgt).abs().pow(p).mean()


def reconstruct_unit(unit: nn.Module, quant_in, fp_in, fp_out, cache: UnitCache, recon, gen: torch.Generator,
                     desc: str) -> Dict:
    adarounds = [q for q in unit.modules() if isinstance(q, AdaRoundFakeQuantize) and q.learnable
                 and q.fake_quant_enabled]
    scales = [q.scale for q in unit.modules() if isinstance(q, FakeQuantizeBase) and not q.is_weight
              and q.learnable and q.fake_quant_enabled and isinstance(q.scale, nn.Parameter)]
    if recon.scale_lr == 0:  # activation ranges stay as calibrated (no optimizer, no gradients for them)
        scales = []
    for q in unit.modules():  # parameters not learned here need no gradient (the quantizers then run fused)
        if isinstance(q, FakeQuantizeBase) and not q.is_weight:
            for t in (q.scale, q.zero_point):
                t.requires_grad_(False)
    iters = recon.iters
    t_start = time.time()
    info = {"unit": desc, "adaround_layers": len(adarounds), "act_scales": len(scales)}
    if iters == 0 or (not adarounds and not scales):
        return info
    set_drop_prob(unit, recon.drop_prob)
    opts, scheds = [], []
    if adarounds:
        opts.append(torch.optim.Adam([q.alpha for q in adarounds], lr=recon.round_lr))
    if scales:
        o = torch.optim.Adam(scales, lr=recon.scale_lr)
        opts.append(o)
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=iters, eta_min=0.0))
    for p in adarounds:
        p.alpha.requires_grad_(True)
    for s in scales:
        s.requires_grad_(True)
    warm = int(recon.warm_up * iters)
    b_hi, b_lo = recon.b_range
    n = len(quant_in)
    first = last = None
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
            rec = rec + sum(lp_loss(o, t) for o, t in zip(_flat(out), _flat(tgt))) / recon.batch_size
        if it < warm or not adarounds:
            round_loss = torch.zeros((), device=rec.device)
        else:
            b = b_lo + 0.5 * (b_hi - b_lo) * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm)))
            round_loss = recon.weight * sum(q.rounding_loss(b) for q in adarounds)
        loss = rec + round_loss
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
        if first is None:
            first = float(rec.detach())
        if it % 20 == 0 or it == iters - 1:  # reading a loss syncs the device: only now and then
            last = float(rec.detach())
            bar.set_postfix(rec=f"{last:.3e}", round=f"{float(round_loss.detach()):.2e}")
    for q in adarounds:
        q.alpha.requires_grad_(False)
        q.harden()
    for s in scales:
        s.requires_grad_(False)
    set_drop_prob(unit, 1.0)
    info.update(first_rec_loss=first, last_rec_loss=last, optimize_s=round(time.time() - t_start, 2),
                iter_s=round((time.time() - t_start) / iters, 4))
    return info


def reconstruct(seg, samples, units, recon, seed: int, device) -> List[Dict]:
    storage = device if recon.keep_gpu else torch.device("cpu")
    cache = UnitCache(units, storage, device, seed)
    gen = torch.Generator().manual_seed(seed)
    infos = []
    enc = seg.sam.image_encoder
    if not any(u is enc or any(u is m for m in enc.modules()) for u in units):
        # float image encoder: compute each sample's embedding once and replay it in every capture pass
        disable_all(seg.sam)
        with torch.no_grad():
            feats = [cache.store(seg.encode(s.image)[0]) for s in _progress(samples, desc="image embeddings")]
        enc.forward = lambda *a, **k: cache.load(feats[cache._cur])
    try:
        return _reconstruct_units(seg, samples, units, recon, gen, cache, infos)
    finally:
        enc.__dict__.pop("forward", None)


def _reconstruct_units(seg, samples, units, recon, gen, cache, infos):
    for i, unit in enumerate(_progress(units, desc="reconstruction units")):
        t_unit = time.time()
        enable_quantization(seg.sam)
        set_drop_prob(seg.sam, 1.0)
        quant_in = cache.capture_inputs(seg, samples, i, "quant")
        disable_all(seg.sam)
        fp_in = cache.capture_inputs(seg, samples, i, "fp")
        fp_out = cache.run_unit(i, fp_in)
        enable_quantization(seg.sam)
        set_drop_prob(seg.sam, 1.0)
        with torch.enable_grad():
            infos.append(reconstruct_unit(unit, quant_in, fp_in, fp_out, cache, recon, gen,
                                          f"unit {i + 1}/{len(units)} {type(unit).__name__}"))
        harden_all(unit)
        quant_out = cache.run_unit(i, quant_in)
        infos[-1]["final_rec_loss"] = float(np.mean([
            sum(float(lp_loss(o, t)) for o, t in zip(_flat(q), _flat(f))) for q, f in zip(quant_out, fp_out)]))
        cache.finish_unit(i, fp_out, quant_out)
        infos[-1]["unit_s"] = round(time.time() - t_unit, 2)  # captures + optimisation + outputs
        del quant_in, fp_in
    return infos


# ---- the whole pipeline ---------------------------------------------------------------------------------------
def quantize_segmenter(seg, samples: List[CalibSample], qcfg: QConfig, quant_encoder: bool, device,
                       legacy_eval_drop: bool = False, log=print) -> Dict:
    """Quantize ``seg.sam`` in place; returns what happened (for metrics.json)."""
    info: Dict[str, Any] = {}
    timer = PhaseTimer()
    sam = seg.sam
    for p in sam.parameters():
        p.requires_grad_(False)
    ctx = build_context(qcfg)
    quantize_sam(sam, ctx, quant_encoder, float_modules=tuple(qcfg.float_modules))
    sam.to(device)
    disable_all(sam)
    pt = qcfg.ptq4sam
    dec_atts = [a for a in quant_attentions(sam.mask_decoder) if isinstance(a, QuantDecoderAttention)]
    # calibration runs the encoder once per image: its activation observers see it (float data) and its output is
    # kept, so BIG's recording and the decoder's calibration run the decoder only (same data as full forwards)
    with timer.phase("calibration"):
        enable_calibration(sam.image_encoder)
        with torch.no_grad():
            feats = [seg.encode(s.image)[0] for s in _progress(samples, desc="calibration: encoder")]
        disable_all(sam)
    if pt.BIG:
        with timer.phase("big"):
            targets = [a for a in dec_atts if any(a.role.endswith(r) for r in pt.big_layers)]
            k_posts = record(seg, samples, targets, ["k_post"], desc="BIG: post-k_proj", rows_per_image=4096,
                             feats=feats)
            info["big"] = big_mod.apply_big(targets, {i: r["k_post"] for i, r in k_posts.items()},
                                            pt.global_num, pt.peak_distance, pt.peak_height)
        flipped = [e["layer"] for e in info["big"] if e["bimodal"]]
        log(f"BIG: bimodal and flipped: {flipped or 'none'} (of {[e['layer'] for e in info['big']]})")
    with timer.phase("calibration"):  # weights (after BIG's folds), then the decoder on the kept image embeddings
        for m in quantized_layers(sam):
            m.calibrate_weight()
        enable_calibration(sam)
        disable_all(sam.image_encoder)
        with torch.no_grad():
            for s, f in zip(_progress(samples, desc="calibration: decoder"), feats):
                forward_sample(seg, s, f)
        del feats
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
    if pt.AGQ:
        with timer.phase("agq"):
            atts = [a for a in quant_attentions(sam) if a.uses_agq]
            recs = record(seg, samples[: pt.agq_images], atts, ["attn", "v"], desc="AGQ: softmax")
            info["agq"] = []
            for a in _progress(atts, desc="AGQ: tau search"):
                r = recs[id(a)]
                res = agq_mod.search_tau(list(zip(r["attn"], r["v"])), a.attn_quant.quantizer.bit, pt.taus,
                                         pt.scale_ratios, pt.p)
                q: AGQFakeQuantize = a.attn_quant.quantizer
                q.tau = res["tau"]
                q.set_qparams(torch.tensor([res["scale"]], device=device), torch.zeros(1, device=device))
                q.initialized = True
                info["agq"].append({"layer": getattr(a, "role", type(a).__name__), **res})
            del recs
        info["agq_search_s"] = timer.times["agq"]
        taus = [e["tau"] for e in info["agq"]]
        log(f"AGQ: tau per attention {taus}")
    with timer.phase("reconstruction"):
        units = recon_units(sam, quant_encoder)
        if qcfg.recon.iters > 0:
            info["recon"] = reconstruct(seg, samples, units, qcfg.recon, qcfg.seed, device)
    info["reconstruction_s"] = timer.times["reconstruction"]
    info["ptq_phases_s"] = dict(timer.times)
    info["adaround_hardened"] = harden_all(sam)
    enable_quantization(sam)
    set_drop_prob(sam, 1.0)
    if legacy_eval_drop:
        set_drop_prob(sam, 0.5, only_layer_inputs=True)
    info["legacy_eval_drop"] = legacy_eval_drop
    info["num_quantizers"] = sum(1 for q in sam.modules() if isinstance(q, FakeQuantizeBase) and q.fake_quant_enabled)
    freeze(sam)
    return info


# ---- save / load ---------------------------------------------------------------------------------------------
QUANT_ATTRS = ("initialized", "observer_enabled", "fake_quant_enabled", "drop_prob", "hard", "tau")


def save_quantized(sam, path, extra: Dict) -> None:
    meta = {n: {a: getattr(q, a) for a in QUANT_ATTRS if hasattr(q, a)}
            for n, q in sam.named_modules() if isinstance(q, FakeQuantizeBase)}
    torch.save({"state_dict": sam.state_dict(), "quant_meta": meta, **extra}, path)


def load_quantized(sam, path, device) -> Dict:
    """Restore a model saved by :func:`save_quantized` into ``sam`` already converted with the same q_config."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    state, meta = ckpt["state_dict"], ckpt["quant_meta"]
    mods = dict(sam.named_modules())
    missing = sorted(set(meta) - {n for n, m in mods.items() if isinstance(m, FakeQuantizeBase)})
    if missing:
        raise ValueError(f"{path}: quantizers {missing[:5]} do not exist in this model; was it saved with another "
                         "q_config / --quant-encoder setting?")
    for name, attrs in meta.items():
        q = mods[name]
        q.set_qparams(state[f"{name}.scale"], state[f"{name}.zero_point"])
        if f"{name}.alpha" in state:
            q.alpha = nn.Parameter(state[f"{name}.alpha"].clone(), requires_grad=False)
        for a, v in attrs.items():
            setattr(q, a, v)
        for bname in ("min_val", "max_val"):  # observer buffers may be per-channel
            key = f"{name}.observer.{bname}"
            if key in state:
                setattr(q.observer, bname, state[key].clone())
    sam.load_state_dict(state, strict=True)
    sam.to(device)
    freeze(sam)
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "quant_meta")}
