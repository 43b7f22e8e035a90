"""Mixed precision, reported honestly: per-layer MACs, MAC-weighted average weight / activation bits, and the
choice of per-module bit overrides under an average-bit budget (``tools/mixed_precision.py``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .quantization.qmodules import _QuantWeightMixin


@torch.no_grad()
def layer_macs(model: nn.Module, run) -> Dict[str, int]:
    """Multiply-accumulates of every quantized Linear / Conv layer (by module name) during ``run()``."""
    macs: Dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if not isinstance(m, _QuantWeightMixin):
            continue

        def hook(mod, inp, out, key=name):
            w = mod.weight
            if isinstance(mod, nn.Linear):
                n = out.numel() * w.shape[1]
            else:  # conv: each output element sums in_channels / groups x kernel elements
                n = out.numel() * (w.shape[1] if not getattr(mod, "transposed", False) else w.shape[0] // mod.groups) \
                    * int(torch.tensor(w.shape[2:]).prod())
            macs[key] = macs.get(key, 0) + int(n)
        hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_bits(model: nn.Module) -> Dict[str, Tuple[Optional[int], Optional[int]]]:
    """(weight bits, input bits) of each quantized layer (None where that side stays float)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _QuantWeightMixin):
            wq, aq = m.weight_quantizer, m.input_quant.quantizer
            out[name] = (wq.bit if wq is not None else None, aq.bit if aq is not None else None)
    return out


def average_bits(bits: Dict[str, Tuple[Optional[int], Optional[int]]], macs: Dict[str, int],
                 float_bits: int = 32) -> Tuple[float, float]:
    """MAC-weighted average (weight bits, activation bits) over the quantized layers; a side left float counts as
    ``float_bits``. Layers that ``macs`` never saw run no arithmetic and do not count."""
    tot = sum(macs.get(n, 0) for n in bits) or 1
    w = sum(macs.get(n, 0) * (b[0] or float_bits) for n, b in bits.items()) / tot
    a = sum(macs.get(n, 0) * (b[1] or float_bits) for n, b in bits.items()) / tot
    return round(w, 3), round(a, 3)


def mac_weighted_bits(seg, samples, float_bits: int = 32) -> Tuple[float, float]:
    """:func:`average_bits` of a quantized segmenter (``seg.sam``), MACs counted on the first sample with a box
    (one box). Where every quantized layer has the same (weight, input) bits, that pair is the average whatever the
    MACs are, and no forward pass runs."""
    bits = layer_bits(seg.sam)
    pairs = set(bits.values())
    if len(pairs) == 1 and None not in next(iter(pairs)):
        w, a = next(iter(pairs))
        return float(w), float(a)
    probe = next(s for s in samples if len(s.boxes))
    return average_bits(bits, layer_macs(seg.sam, lambda: seg(probe.image, probe.boxes[:1])), float_bits)


def choose_overrides(units: List[Dict], macs: Dict[str, int], low: int, high: int, budget: float) -> List[Dict]:
    """Greedy: raise whole units (``{"name", "layers", "error"}``) from ``low`` to ``high`` bits (weights and
    activations), most error removed per MAC first, while the MAC-weighted average stays <= ``budget``.
    Returns the q_config ``overrides`` (one ``{pattern: '<unit>.*', w_bit, a_bit}`` per raised unit, plus the unit's
    own name for its attention quantizers)."""
    total = sum(macs.values()) or 1
    avg = float(low)
    chosen = []
    for u in sorted(units, key=lambda u: -u["error"] / max(1, sum(macs.get(n, 0) for n in u["layers"]))):
        cost = sum(macs.get(n, 0) for n in u["layers"]) * (high - low) / total
        if u["error"] <= 0 or avg + cost > budget + 1e-9:
            continue
        avg += cost
        chosen.append(u["name"])
    out = []
    for name in chosen:
        out += [{"pattern": name, "w_bit": high, "a_bit": high}, {"pattern": f"{name}.*", "w_bit": high, "a_bit": high}]
    return out


def bits_label(w_bit, a_bit, avg_bits: Optional[Tuple[float, float]] = None, mixed: bool = False) -> str:
    """How a run is named: ``W<b>A<b>`` when uniform; a mixed-precision run (per-module overrides) by its MAC-weighted
    average bits, never by its base width."""
    if not mixed:
        return f"W{w_bit}A{a_bit}"
    if avg_bits is None:
        return f"mixed (base W{w_bit}A{a_bit})"
    return f"mixed: avg W{avg_bits[0]:.2f} / A{avg_bits[1]:.2f}"
