"""State switches over every fake quantizer of a model (calibration / quantization / float / QDrop / hardening)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .fake_quant import AdaRoundFakeQuantize, FakeQuantizeBase
from .qmodules import _QuantWeightMixin


def _each(model: nn.Module, kind=FakeQuantizeBase):
    """Modules of ``kind``; every switch goes through here, so it also drops evaluation caches (:func:`freeze`)."""
    unfreeze(model)
    return [m for m in model.modules() if isinstance(m, kind)]


def freeze(model: nn.Module) -> None:
    """Evaluation fast path: quantize every weight once and fix every quantizer's constants, so a forward pays only
    one fused fake-quant kernel per activation point. Gradients, a state switch or an in-place weight change fall back
    to (or restore) the full computation, so results are bit-identical either way."""
    for m in model.modules():
        if isinstance(m, (FakeQuantizeBase, _QuantWeightMixin)):
            m.freeze()


def unfreeze(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (FakeQuantizeBase, _QuantWeightMixin)):
            m.unfreeze()


def enable_calibration(model: nn.Module) -> None:
    """Activation observers see float activations; nothing is quantized (weights are observed once, apart)."""
    for q in _each(model):
        q.observer_enabled, q.fake_quant_enabled = not q.is_weight, False


def enable_quantization(model: nn.Module, weights: bool = True) -> None:
    """Every calibrated quantizer on (``weights=False``: the activation quantizers only, weights stay float)."""
    for q in _each(model):
        q.observer_enabled, q.fake_quant_enabled = False, q.initialized and (weights or not q.is_weight)


def disable_all(model: nn.Module) -> None:
    """Every quantizer off: the model computes exactly what the float model computes."""
    for q in _each(model):
        q.observer_enabled, q.fake_quant_enabled = False, False


def set_drop_prob(model: nn.Module, p: float, only_layer_inputs: bool = False) -> None:
    """QDrop probability (of using the quantized value) for the activation quantizers (optionally only those
    quantizing a Linear/Conv input, which is what the paper repo's evaluation left at 0.5)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {p}")
    for q in _each(model):
        if not q.is_weight and (q.is_layer_input or not only_layer_inputs):
            q.drop_prob = p


def harden_all(model: nn.Module) -> int:
    """Harden every AdaRound quantizer; returns how many are hard."""
    for q in _each(model, AdaRoundFakeQuantize):
        q.harden()
    return count_hard(model)


def count_hard(model: nn.Module) -> int:
    return sum(1 for q in model.modules() if isinstance(q, AdaRoundFakeQuantize) and q.hard)


def min_drop_prob(model: nn.Module) -> float:
    """Smallest drop probability over quantizers that are enabled."""
    return min((q.drop_prob for q in model.modules() if isinstance(q, FakeQuantizeBase) and q.fake_quant_enabled),
               default=1.0)


QUANT_ATTRS = ("initialized", "observer_enabled", "fake_quant_enabled", "drop_prob", "hard", "tau", "ch_axis",
               "grid_rate", "levels_log", "levels_uni", "lnq_alpha")


def quant_meta(model: nn.Module) -> dict:
    """Each quantizer's switches (plain values), by module name: with the state dict, the whole quantized state."""
    return {n: {a: getattr(q, a) for a in QUANT_ATTRS if hasattr(q, a)}
            for n, q in model.named_modules() if isinstance(q, FakeQuantizeBase)}


def restore_quantizers(model: nn.Module, state: dict, meta: dict) -> None:
    """Scale / zero point (as parameters or buffers, per the quantizer's kind), switches and observer ranges of the
    quantizers named in ``meta`` from ``state``; the caller then loads the state dict strictly."""
    mods = dict(model.named_modules())
    for name, attrs in meta.items():
        q = mods[name]
        q.set_qparams(state[f"{name}.scale"], state[f"{name}.zero_point"])
        for a, v in attrs.items():
            setattr(q, a, v)
        if f"{name}.group" in state:  # CAG / HLUQ: one group index per channel, sized at calibration
            q.group = state[f"{name}.group"].clone()
        if f"{name}.fp_min" in state:  # HLUQ: one value per group
            q.fp_min = state[f"{name}.fp_min"].clone()
            q.scale_log = nn.Parameter(state[f"{name}.scale_log"].clone(), requires_grad=False)
        for bname in ("min_val", "max_val"):  # observer buffers may be per-channel
            key = f"{name}.observer.{bname}"
            if key in state:
                setattr(q.observer, bname, state[key].clone())
    for key in state:
        if key.endswith(".gptq_weight"):  # a method's weight to quantize (GPTQ's, ACNR's); the float weight is kept
            mods[key[: -len(".gptq_weight")]].set_quant_source(state[key])


@contextlib.contextmanager
def perturbed_outputs(model: nn.Module, rel: float, seed: int = 0) -> Iterator[int]:
    """Inside the block every layer with a weight quantizer (quantized Linear / Conv) multiplies its output by
    (1 + rel * N(0, 1)), drawn from a generator seeded with ``seed``: float noise of a chosen size (TF32 / another
    device / another thread count give ~1e-6 to 1e-3), to measure how much of a quantized model's accuracy is
    settled by its quantization and how much by float rounding (``benchmark_accuracy.py --perturb``). Yields the
    number of perturbed layers; the hooks are removed on exit, whatever happens inside."""
    if not rel >= 0:
        raise ValueError(f"perturbed_outputs: rel must be >= 0, got {rel}")
    gens = {}

    def hook(module, args, out):
        gen = gens.get(out.device)
        if gen is None:
            gen = gens[out.device] = torch.Generator(device=out.device).manual_seed(seed)
        noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        return out * noise.mul_(rel).add_(1.0)

    layers = [m for m in model.modules() if isinstance(m, _QuantWeightMixin)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        yield len(layers)
    finally:
        for h in handles:
            h.remove()
