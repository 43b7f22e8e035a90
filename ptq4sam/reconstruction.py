"""Block / module reconstruction (QDrop with AdaRound and LSQ, the paper's algorithm): the cache of unit inputs and
outputs, the loss and AdaRound's temperature, one unit's optimisation and the driver over all units."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .progress import progress as _progress
from .quantization import (
    AdaRoundFakeQuantize,
    FakeQuantizeBase,
    disable_all,
    enable_quantization,
    set_drop_prob,
)
from .quantization.fake_quant import qdrop_mask
from .samples import forward_sample, has_boxes


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


class StageGroup(nn.Module):
    """A run of consecutive blocks reconstructed as one unit (e.g. SAQ-SAM's encoder stages: the blocks up to a
    global-attention block). Not part of the model: the model calls the blocks; :class:`UnitCache` grabs the group's
    input at its first block and stubs the group as a whole (first block -> the stored output, the rest identity)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, *args, **kwargs):
        for b in self.blocks:
            x = b(x, *args, **kwargs)
        return x


def _identity(x, *args, **kwargs):
    return x


def stage_entry(stage: nn.Module) -> nn.Module:
    """The module of the model a stage's input goes into (a group's first block)."""
    return stage.blocks[0] if isinstance(stage, StageGroup) else stage


def _patch(stage: nn.Module, fn, patched: List[nn.Module]) -> None:
    """Make the model's call of ``stage`` return ``fn(...)`` (a group: its later blocks pass through)."""
    entry = stage_entry(stage)
    entry.forward = fn
    patched.append(entry)
    if isinstance(stage, StageGroup):
        for b in stage.blocks[1:]:
            b.forward = _identity
            patched.append(b)


def _unpatch(patched: List[nn.Module]) -> None:
    for m in patched:
        m.__dict__.pop("forward", None)


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

    def store_copy(self, x):
        """:meth:`store` as a copy: the rest of a forward cannot change it in place."""
        return _map_tensors(x, lambda t: t.detach().to(self.storage, copy=True))

    def load(self, x):
        return _map_tensors(x, lambda t: t.to(self.compute))

    def _grabber(self, captured: List[Any]):
        """A forward that stores its inputs (args, kwargs) in ``captured`` and stops the forward pass."""
        def grab(*args, **kwargs):
            captured.append(self.store((args, kwargs)))
            raise _Stop
        return grab

    def _stub(self, j: int, mode: Optional[str]):
        """What stage j returns in a forward that skips it: the previous stage's stored output (``mode``), or zeros
        of its output's shape (later stages overwrite them)."""
        if mode is not None and mode in self.prev_out:
            outs = self.prev_out[mode]
            return lambda *a, **k: self.load(outs[self._cur])
        shp = self.shapes[j]
        return lambda *a, **k: _map_tensors(shp[self._cur], lambda t: torch.zeros(t.shape, dtype=t.dtype,
                                                                                   device=self.compute))

    def capture_inputs(self, seg, samples, idx: List[int], i: int, mode: str):
        """Inputs (args, kwargs) of stage i for the samples ``idx``, with earlier stages replaced by stubs."""
        captured: List[Any] = []
        stage = self.stages[i]
        patched: List[nn.Module] = []
        try:
            for j in range(i):
                _patch(self.stages[j], self._stub(j, mode if j == i - 1 else None), patched)
            entry = stage_entry(stage)
            entry.forward = self._grabber(captured)
            patched.append(entry)
            with torch.no_grad():
                for self._cur in idx:
                    try:
                        forward_sample(seg, samples[self._cur])
                    except _Stop:
                        continue
                    raise RuntimeError(f"stage {i} ({type(stage).__name__}) was not reached in the forward of "
                                       f"calibration sample {self._cur}")
        finally:
            _unpatch(patched)
        return captured

    @contextlib.contextmanager
    def replaced(self, i: int, out, cur: int):
        """Within: the model's stage i returns ``out`` (e.g. a unit's output with its gradient) and the stages before
        it return zeros (skipped: nothing after stage i reads them), for sample ``cur``."""
        patched: List[nn.Module] = []
        self._cur = cur
        try:
            for j in range(i):
                _patch(self.stages[j], self._stub(j, None), patched)
            _patch(self.stages[i], lambda *a, **k: out, patched)
            yield
        finally:
            _unpatch(patched)

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

    def capture_float_units(self, stage: nn.Module, units: List[nn.Module], stage_inputs) -> Dict[int, Any]:
        """For every unit inside ``stage``: (inputs, outputs) per sample, from one pass of the stage over its cached
        float inputs (hooks, no early stop). Valid for the whole stage: the float model does not change while its
        units are reconstructed. Call with every quantizer off. A unit not called exactly once per sample is left
        out (its caller captures it alone)."""
        ins: Dict[int, List[Any]] = {id(u): [] for u in units}
        outs: Dict[int, List[Any]] = {id(u): [] for u in units}
        hooks = []
        for u in units:
            got_in, got_out = ins[id(u)], outs[id(u)]
            hooks.append(u.register_forward_pre_hook(
                lambda m, a, k, _i=got_in: _i.append(self.store_copy((a, k))), with_kwargs=True))
            hooks.append(u.register_forward_hook(lambda m, a, o, _o=got_out: _o.append(self.store_copy(o))))
        try:
            with torch.no_grad():
                for args, kwargs in stage_inputs:
                    a, k = self.load((args, kwargs))
                    stage(*a, **k)
        finally:
            for h in hooks:
                h.remove()
        n = len(stage_inputs)
        return {i: (ins[i], outs[i]) for i in ins if len(ins[i]) == n and len(outs[i]) == n}

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



def lp_loss(pred, tgt, p=2.0, reduction: str = "paper", dim: int = 1):
    """Reconstruction loss. ``'paper'``: ``|pred - tgt|^p`` summed over ``dim`` (1: tokens / channels, as the
    paper's code), averaged over the rest; ``'mean'``: averaged over every element (an option; 7x-4096x weaker beside
    AdaRound's summed regulariser, depending on dim 1)."""
    d = (pred - tgt).abs().pow(p)
    if reduction == "paper" and d.dim() > 1:
        return d.sum(dim).mean()
    return d.mean()


class UnitObjective:
    """What a unit's reconstruction minimises beyond the paper's output loss (a method's, e.g. SAQ-SAM's PAR):
    weights on the unit's own output terms and an extra term per step. The default is the paper's loss."""

    def local_weights(self, unit: nn.Module, n: int) -> Optional[List[float]]:
        """Weights of the unit's ``n`` output tensors' losses (None: 1 each)."""
        return None

    def prepare(self, cache: "UnitCache", i: int, stage: nn.Module, unit: nn.Module, quant_state: Callable[[], None]):
        """Before ``unit`` (of stage ``i``) is optimised, in the quantized state (``quant_state()`` restores it)."""

    def extra(self, unit: nn.Module, out, sample: int, gen: torch.Generator) -> Optional[torch.Tensor]:
        """The extra loss of one step: ``out`` = the unit's output on calibration sample ``sample``."""
        return None


def temperature(it: int, iters: int, warm_up: float, b_range, mode: str = "linear") -> Optional[float]:
    """AdaRound's annealed exponent b at step ``it`` (0-based), or None during the warm-up (no rounding loss).

    ``'linear'``: the paper's ``LinearTempDecay`` (its step counter starts at 1; b falls linearly from b_range[0] to
    b_range[1] between warm_up * iters and iters). ``'cosine'``: a cosine schedule between the same bounds (an option)."""
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
                     desc: str, objective: Optional[UnitObjective] = None,
                     sample_ids: Optional[List[int]] = None) -> Dict:
    """Optimise ``unit``'s rounding (and scales) on its cached inputs; ``objective`` (with ``sample_ids``, the
    calibration index of each cached input) adds a method's terms to the loss."""
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
        p.alpha.grad = None
    for s in scales + offsets:
        s.requires_grad_(True)
        s.grad = None  # nothing left from a loss computed before this unit
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
            terms = [lp_loss(o, t, reduction=recon.loss) for o, t in zip(_flat(out), _flat(tgt))]
            weights = objective.local_weights(unit, len(terms)) if objective is not None else None
            step = sum(terms) if weights is None else sum(w * t for w, t in zip(weights, terms))
            if objective is not None:
                more = objective.extra(unit, out, sample_ids[idx], gen)
                if more is not None:
                    step = step + more
            rec = rec + step / recon.batch_size
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
            s.grad = None  # no optimizer holds s: its gradient would otherwise add up over the steps
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



def global_rng() -> Dict[str, Any]:
    """torch's global generator state(s), which QDrop inside a unit draws from."""
    out: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def reconstruct(seg, samples, stages, recon, seed: int, device, paper_bugs: bool = False,
                done: Optional[List[Dict]] = None, rng: Optional[Dict] = None,
                on_unit: Optional[Callable[[List[Dict], Dict], None]] = None,
                embeddings: Optional[Dict[int, torch.Tensor]] = None,
                objective: Optional[UnitObjective] = None) -> List[Dict]:
    """Reconstruct ``stages`` ([(stage, units)], :func:`quant_sam.recon_stages`) one unit at a time, in order.

    Decoder stages use the calibration images that have boxes. ``paper_bugs`` reproduces the paper code's leaks
    after each unit: only its first AdaRound layer is hardened (the others keep soft rounding) and its layer-input
    quantizers stay at the training drop probability (so later units and the evaluation see them).

    Resuming: ``done`` = the records of the units already reconstructed (their state is in the model) and ``rng`` the
    generators' states saved after the last of them; finished stages are replayed (forwards only) to rebuild the
    cached inputs. ``on_unit(records, rng)`` is called after every unit (to save the state). ``embeddings``: the
    float image encoder's outputs of the samples with boxes (by index) when calibration kept them (else encoded here).
    ``objective``: a method's loss terms (:class:`UnitObjective`; None: the paper's loss)."""
    if objective is not None and paper_bugs:
        raise InputError("--paper-eval-bugs reproduces the paper's per-module leaks; a method with its own "
                         "reconstruction units and loss (e.g. saqsam.PAR) cannot run with it")
    if done and paper_bugs:
        raise InputError("--resume cannot continue a --paper-eval-bugs run: its leaking QDrop layers draw from the "
                         "global random generator during the replayed forwards; rerun it from the start")
    storage = device if recon.keep_gpu else torch.device("cpu")
    cache = UnitCache([s for s, _ in stages], storage, device, seed)
    gen = torch.Generator().manual_seed(seed)
    if not rng:  # QDrop inside a unit draws from the global generator: seeded here, whatever ran before
        torch.manual_seed(seed)
    if rng:  # the states after the last finished unit (the replayed forwards draw no random numbers)
        if "gen" in rng:  # absent when resuming before the first unit
            gen.set_state(rng["gen"])
            cache.mask_gen.set_state(rng["mask_gen"])
        torch.set_rng_state(rng["torch"])  # QDrop inside a unit draws from the global generator
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
    sam = seg.sam
    for q in sam.modules():  # each unit turns on the gradients of its own parameters only: a loss through later
        if isinstance(q, FakeQuantizeBase):  # units (e.g. PAR's) must not backpropagate into theirs
            for t in q.parameters():
                t.requires_grad_(False)
    enc, dec = sam.image_encoder, sam.mask_decoder
    dec_ids = {id(m) for m in dec.modules()}
    all_idx = list(range(len(samples)))
    box_idx = [i for i in all_idx if has_boxes(samples[i])]
    if not any(id(stage_entry(s)) in {id(m) for m in enc.modules()} for s, _ in stages):
        # float image encoder: compute each sample's embedding once and replay it in every capture pass
        disable_all(sam)
        with torch.no_grad():
            feats = {i: cache.store(embeddings[i] if embeddings is not None and i in embeddings
                                    else seg.encode(samples[i].image)[0])
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
            inner = [un for un in units if un is not stage]
            # encoder stages: every unit's float inputs and outputs from one float pass (an image's tensors are
            # small); decoder stages hold every prompt's tokens: one unit at a time
            f_units = {}
            if len(inner) > 1 and id(stage) not in dec_ids and u + len(units) > skip:
                disable_all(sam)
                f_units = cache.capture_float_units(stage, inner, f_stage_in)
            for unit in units:
                u += 1
                if u <= skip:  # finished before the resume: its state is loaded
                    f_units.pop(id(unit), None)
                    continue
                trained = True
                next(ticks, None)
                t_unit = time.time()
                fp_out = None
                if unit is stage:
                    quant_in, fp_in = q_stage_in, f_stage_in
                else:
                    quant_state()
                    quant_in = cache.capture_within(stage, unit, q_stage_in)
                    disable_all(sam)
                    if id(unit) in f_units:
                        fp_in, fp_out = f_units.pop(id(unit))
                    else:
                        fp_in = cache.capture_within(stage, unit, f_stage_in)
                disable_all(sam)
                if fp_out is None:
                    fp_out = cache.run(unit, fp_in)
                quant_state()
                name = f"unit {len(infos) + 1}/{n_units} {type(unit).__name__}"
                if objective is not None:
                    objective.prepare(cache, i, stage, unit, quant_state)
                with torch.enable_grad():
                    infos.append(reconstruct_unit(unit, quant_in, fp_in, fp_out, cache, recon, gen, name,
                                                  objective, idx))
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

