"""Compact quantized checkpoints: integer weights (4-bit and below packed two per byte), their scales and zero
points, every activation quantizer's parameters and switches, the float parts as they are, the resolved q_config and a
format version. Plain tensors and containers only, so ``torch.load(weights_only=True)`` reads it and loading a file
from elsewhere runs no code.

A quantized weight is stored as its integer grid index ``q - quant_min`` (``q = clamp(round-or-AdaRound(w / s) + zp)``);
at load the weight becomes ``(q - zp) * s``, a point of the quantizer's grid, and AdaRound's learned rounding (no
longer needed, and as large as the weight) is dropped: the weight quantizer then maps the weight onto itself, so the
loaded model computes exactly what the saved one did (tested bit for bit).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from ..errors import atomic_write
from ..models.sam_builder import CheckpointError, load_state_dict_strict, load_weights_file
from ..quantization import AdaRoundFakeQuantize, FakeQuantizeBase
from ..quantization.fake_quant import _bshape
from ..quantization.qmodules import _QuantWeightMixin
from ..quantization.state import quant_meta, restore_quantizers

COMPACT_FORMAT = "ptq4sam-compact-1"


@dataclass
class CompactInfo:
    bytes: int  # file size
    fp_bytes: int  # the float model's state dict, as torch.save writes it
    int_layers: int
    float_layers: int  # quantized layers whose weights did not land exactly on their grid (kept float; expected 0)

    @property
    def ratio(self) -> float:
        return self.bytes / max(1, self.fp_bytes)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2**bits -> uint8; for bits <= 4 two per byte (low nibble first)."""
    flat = q.reshape(-1).to(torch.uint8)
    if bits > 4:
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack(p: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits > 4:
        return p[:numel]
    out = torch.stack([p & 0xF, p >> 4], 1).reshape(-1)
    return out[:numel]


def fp_state_bytes(sam: nn.Module) -> int:
    """Size of the float model's state dict as torch.save writes it (the quantized model without its quantizers)."""
    buf = io.BytesIO()
    torch.save({k: v for k, v in sam.state_dict().items() if "quantizer." not in k}, buf)
    return buf.tell()


@torch.no_grad()
def integer_grid(layer):
    """(q, scale, zero point, axis) with ``(q - zp) * scale`` == the layer's quantized weight, q integers in
    [quant_min, quant_max] (float tensor; axis -1: per tensor), or None if the weight is not exactly on its grid."""
    wq = layer.weight_quantizer
    w_q = wq(layer.quant_source()).detach()
    scale, zp = wq._eval_params()
    axis = -1 if wq.ch_axis == -1 else wq.ch_axis % w_q.dim()
    shape = _bshape(w_q, axis) if axis != -1 else [1] * w_q.dim()
    s, z = scale.reshape(shape).to(w_q), zp.reshape(shape).to(w_q)
    q = torch.round(w_q / s + z).clamp(wq.quant_min, wq.quant_max)
    if not torch.equal((q - z) * s, w_q):
        return None
    return q, scale, zp, axis


def _int_weight(layer):
    """(grid index tensor, bits) of a layer's quantized weight, or None if the weight is not exactly on its grid."""
    got = integer_grid(layer)
    if got is None:
        return None
    return (got[0] - layer.weight_quantizer.quant_min).to(torch.int32), layer.weight_quantizer.bit


def save_compact(sam: nn.Module, path, q_config: Dict, quant_encoder: bool, info: Optional[Dict] = None) -> CompactInfo:
    """Write the quantized ``sam`` (evaluation state: AdaRound hardened) compactly and atomically."""
    state = {k: v.detach().cpu() for k, v in sam.state_dict().items()}
    int_weights, n_float = {}, 0
    for name, layer in sam.named_modules():
        if not isinstance(layer, _QuantWeightMixin):
            continue
        wq = layer.weight_quantizer
        if wq is None or not (wq.fake_quant_enabled and wq.initialized):
            continue
        got = _int_weight(layer)
        if got is None:
            n_float += 1
            continue
        q, bits = got
        int_weights[name] = {"q": pack(q, bits).cpu(), "bits": bits, "shape": list(q.shape)}
        state.pop(f"{name}.weight")
        state.pop(f"{name}.gptq_weight", None)  # the weight quantized instead (GPTQ's, ACNR's): its quantization is in q
        state.pop(f"{name}.weight_quantizer.alpha", None)  # AdaRound's learned rounding: in q now
    # a weight observer's per-channel ranges only served to find the scale / zero point, which are kept
    state = {k: v for k, v in state.items() if ".weight_quantizer.observer." not in k}
    meta = quant_meta(sam)
    obj = {"format": COMPACT_FORMAT, "q_config": json.dumps(q_config, sort_keys=True), "quant_encoder": quant_encoder,
           "info": json.dumps(info or {}), "int_weights": int_weights, "state": state, "quant_meta": meta}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    from pathlib import Path  # noqa: PLC0415

    return CompactInfo(Path(path).stat().st_size, fp_state_bytes(sam), len(int_weights), n_float)


def read_compact(path) -> Dict:
    """Read and check the format (``weights_only=True``: no code from the file runs)."""
    obj = load_weights_file(path, "compact quantized SAM checkpoint (--save_sam_path)")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt != COMPACT_FORMAT:
        hint = (" (a float checkpoint of an older toolkit version: quantize again with --save_sam_path)"
                if isinstance(obj, dict) and "quant_meta" in obj and "format" not in obj else "")
        raise CheckpointError(f"{path}: not a checkpoint of format {COMPACT_FORMAT!r} (found {fmt!r}){hint}")
    return obj


@torch.no_grad()
def load_compact(sam: nn.Module, obj: Dict, path) -> Dict:
    """Restore a :func:`read_compact` object into ``sam`` converted with the same q_config; returns the saved info."""
    mods = dict(sam.named_modules())
    have = {n for n, m in mods.items() if isinstance(m, FakeQuantizeBase)}
    meta = obj["quant_meta"]
    if set(meta) != have:
        raise CheckpointError(f"{path}: its quantizers do not match this model's (in the file only: "
                              f"{sorted(set(meta) - have)[:3]}, in the model only: {sorted(have - set(meta))[:3]})")
    state = dict(obj["state"])
    for name, rec in obj["int_weights"].items():
        layer = mods.get(name)
        if not isinstance(layer, _QuantWeightMixin) or layer.weight_quantizer is None:
            raise CheckpointError(f"{path}: '{name}' holds integer weights but is not a quantized layer here")
        wq = layer.weight_quantizer
        numel = 1
        for d in rec["shape"]:
            numel *= d
        q = unpack(rec["q"], rec["bits"], numel).reshape(rec["shape"]).to(torch.float32) + wq.quant_min
        scale = state[f"{name}.weight_quantizer.scale"].float()
        zp = state[f"{name}.weight_quantizer.zero_point"].round()
        shape = _bshape(q, wq.ch_axis % q.dim()) if wq.ch_axis != -1 else [1] * q.dim()
        state[f"{name}.weight"] = (q - zp.reshape(shape)) * scale.reshape(shape)
        if isinstance(wq, AdaRoundFakeQuantize):
            wq.alpha = None  # the weight is on its grid: nearest rounding maps it onto itself
    restore_quantizers(sam, state, meta)
    for k, v in sam.state_dict().items():  # weight observers' ranges are not stored (see save_compact)
        if ".weight_quantizer.observer." in k:
            state.setdefault(k, v)
    load_state_dict_strict(sam, state, str(path))
    return json.loads(obj["info"])


def same_checkpoint(a, b) -> bool:
    """Two checkpoint objects (nested dicts / lists of tensors and plain values) are identical, bit for bit."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_checkpoint(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_checkpoint(x, y) for x, y in zip(a, b))
    return a == b
