"""ONNX INT4 weight storage: the integer weights of an exported graph that fit 4 bits (every weight of a W<=4 model)
stored as packed 4-bit initializers (two per byte) feeding their ``DequantizeLinear`` (opset 21), instead of one int8
per value: INT4 with zero point 0 where ``q - z`` is in [-8, 7] (a symmetric grid), else UINT4 with a zero point per
channel (an asymmetric grid). The dequantized weights are the same numbers, so the
graph computes exactly what the int8-stored graph computes; what a runtime keeps in memory is its choice (the
manifest says what was measured)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

INT4_OPSET = 21  # DequantizeLinear takes INT4 from opset 21
EXPORT_OPSET = 20  # the TorchScript exporter's highest: graphs are exported at 20 and relabelled 21 when packed


def pack_nibbles(values: np.ndarray) -> bytes:
    """4-bit values (signed or not), flattened, two per byte: the first in the low nibble (ONNX's layout)."""
    v = (values.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return (v[0::2] | (v[1::2] << 4)).tobytes()


def pack_int4_weights(path: Path) -> Dict[str, int]:
    """Rewrite the ONNX graph at ``path`` (exported at opset >= 20; relabelled 21) with every integer weight of a
    ``DequantizeLinear`` whose values span at most 16 levels (per channel) stored as INT4 / UINT4 (module docstring;
    its zero point of the same type, this node's own). Returns counts: ``packed`` weights, ``kept`` (those wider than
    4 bits) and the weights' bytes before / after."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    from .onnx_graph import attr, constants  # noqa: PLC0415

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < EXPORT_OPSET:
        raise ValueError(f"{path}: opset {opset}; INT4 storage needs a graph of opset >= {EXPORT_OPSET}")
    for o in model.opset_import:  # 20 -> 21 changes no operator's meaning (21 adds types: INT4 / UINT4, float8)
        if o.domain in ("", "ai.onnx") and o.version < INT4_OPSET:
            o.version = INT4_OPSET
    g = model.graph
    const = constants(g)
    uses: Dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    packed = kept = before = after = 0
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        w = const.get(n.input[0])
        if w is None or w.dtype not in (np.int8, np.uint8) or uses.get(n.input[0], 0) != 1:
            continue  # an activation's QDQ (its input is computed), or a weight another node reads too
        q = w.astype(np.int32)
        zt = const.get(n.input[2]) if len(n.input) > 2 else None
        zp = np.zeros((), np.int32) if zt is None else zt.astype(np.int32)
        axis = attr(n, "axis", 1)
        shape = [1] * q.ndim
        if zp.ndim:
            shape[axis] = -1
        d = q - zp.reshape(shape)  # the dequantized integers: what any storage must keep
        if d.min() >= -8 and d.max() <= 7:  # symmetric: INT4, zero point 0
            dtype, q4, z4 = TensorProto.INT4, d, np.zeros(zp.shape, np.int32)
        else:  # an asymmetric grid (b <= 4: max - min <= 15 per channel): UINT4 with a zero point per channel
            red = tuple(i for i in range(q.ndim) if not zp.ndim or i != (axis % q.ndim))
            lo, hi = d.min(axis=red, keepdims=True), d.max(axis=red, keepdims=True)
            z = np.maximum(-lo, 0)  # a zero point in [0, 15] that puts every d + z in [0, 15]
            if np.any(z + hi > 15):
                kept += 1
                continue
            dtype, q4, z4 = TensorProto.UINT4, d + z, z.reshape(zp.shape)
        before += q.size
        name = n.input[0] + "_4bit"
        g.initializer.append(helper.make_tensor(name, dtype, q.shape, pack_nibbles(q4), raw=True))
        g.initializer.append(helper.make_tensor(name + "_zero_point", dtype, zp.shape, pack_nibbles(z4), raw=True))
        n.input[0] = name
        if len(n.input) > 2:
            n.input[2] = name + "_zero_point"
        else:
            n.input.append(name + "_zero_point")
        after += (q.size + 1) // 2
        packed += 1
    # what no node reads any more: the int8 weights and zero points replaced above
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in read]:
        g.initializer.remove(t)
    for node in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in read]:
        g.node.remove(node)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"packed": packed, "kept": kept, "weight_bytes_int8": before, "weight_bytes_int4": after}
