"""QDQ ONNX export of a quantized SAM: QuantizeLinear / DequantizeLinear exactly where our quantizers are.

Two graphs (the split SAM's own ONNX export and every SAM runtime uses):

* ``encoder.onnx``: ``image`` (1, 3, S, S), prepared as :meth:`BoxPromptSegmenter.prepare_image` does ->
  ``image_embeddings`` (1, C, h, w);
* ``decoder.onnx``: ``image_embeddings`` and ``boxes`` (N, 4, xyxy in the resized input frame, N dynamic) -> prompt
  encoder + mask decoder -> ``low_res_masks`` (N, 1, 4h, 4w) and ``iou`` (N, 1).

What each quantizer becomes (the manifest ``export.json`` lists them by name and kind):

* a uniform activation quantizer (LSQ / LSQ+ / fixed; per tensor or per channel): ``QuantizeLinear`` ->
  ``DequantizeLinear`` with its scale and integer zero point (uint8 when asymmetric, int8 when symmetric); below 8 bits
  a ``Clip`` to the quantizer's float range goes first, so the integer values stay on the b-bit grid
  (``clamp(round(x / s) + z, qmin, qmax)``, what the fake quantizer computes) while int8 kernels run them;
* a quantized weight: the integer weight as an int8 / uint8 initializer -> ``DequantizeLinear`` (per output channel,
  ``axis`` = the quantizer's channel axis); AdaRound's learned rounding is in the integers, BIG's sign folds are in the
  float weights it quantized. When ``q - z`` fits int8 (always for W <= 7 bits) it is stored as that with zero point 0
  (symmetric form: the U8S8 kernels of ONNX Runtime and OpenVINO need it); else as uint8 with per-channel zero points;
* the AGQ log2 softmax quantizer has no integer ONNX operator: it is emulated in float with the very operations the
  torch quantizer computes (``Log``, ``Round``, ``Exp``: :mod:`ptq4sam.quantization.logq`), marked ``emulated`` in
  the manifest; so are HLUQ and LNQ (:mod:`ptq4sam.quantization.lnq`).

The legacy TorchScript exporter is used (``dynamo=False``): it runs the model's Python forward once, so our quantized
modules export as they compute, and an ``autograd.Function.symbolic`` emits each QDQ pair.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import InputError, atomic_write, atomic_write_text
from ..quantization import (
    AdaRoundFakeQuantize,
    AGQFakeQuantize,
    FakeQuantizeBase,
    HLUQFakeQuantize,
    LNQFakeQuantize,
    lnq_reference,
)
from ..quantization.fake_quant import _bshape
from ..quantization.hluq import per_channel
from ..quantization.logq import agq_reference
from ..quantization.qmodules import QuantLinear, _QuantWeightMixin
from .compact import integer_grid

EXPORT_FORMAT = "ptq4sam-onnx-1"
OPSET = 17
ENCODER_FILE, DECODER_FILE, MANIFEST_FILE = "encoder.onnx", "decoder.onnx", "export.json"


# ---- the ONNX pieces ---------------------------------------------------------------------------------------------
class _ActQDQ(torch.autograd.Function):
    """Forward: our fake quantizer's evaluation formula. ONNX: [Clip] -> QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin: int, qmax: int, axis: int, clip: bool):
        zp32 = zp.to(torch.int32)
        if axis == -1:
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp32.reshape(()), qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zp32, axis, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, axis, clip):
        s, z, kw, s_val, z_val = _qparam_nodes(g, scale, zp, axis)
        if clip:
            lo = (qmin - z_val.to(torch.float32)) * s_val
            hi = (qmax - z_val.to(torch.float32)) * s_val
            if axis == -1:
                x = g.op("Clip", x, g.op("Constant", value_t=lo.reshape(())), g.op("Constant", value_t=hi.reshape(())))
            else:
                shape = [1] * _rank(x)
                shape[axis] = -1
                x = g.op("Max", x, g.op("Constant", value_t=lo.reshape(shape)))
                x = g.op("Min", x, g.op("Constant", value_t=hi.reshape(shape)))
        q = g.op("QuantizeLinear", x, s, z, **kw)
        return g.op("DequantizeLinear", q, s, z, **kw)


class _WeightDQ(torch.autograd.Function):
    """Forward: the dequantized integer weight. ONNX: integer initializer -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zp, axis: int):
        shape = _bshape(q, axis) if axis != -1 else [1] * q.dim()
        return (q.to(torch.float32) - zp.to(torch.float32).reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zp, axis):
        s, z, kw, _, _ = _qparam_nodes(g, scale, zp, axis)
        return g.op("DequantizeLinear", q, s, z, **kw)


def _qparam_nodes(g, scale, zp, axis: int):
    """ONNX constants of a QDQ pair's scale and zero point (scalars per tensor, vectors with ``axis`` per channel):
    (scale node, zero-point node, the ``axis`` attribute, scale tensor, zero-point tensor)."""
    s_val, z_val = _const_of(scale), _const_of(zp)
    if axis == -1:
        return (g.op("Constant", value_t=s_val.reshape(())), g.op("Constant", value_t=z_val.reshape(())), {},
                s_val, z_val)
    return g.op("Constant", value_t=s_val), g.op("Constant", value_t=z_val), {"axis_i": axis}, s_val, z_val


def _const_of(value) -> torch.Tensor:
    """The tensor behind a traced constant (``prim::Constant`` / ``onnx::Constant``)."""
    node = value.node()
    if node.kind() in ("prim::Constant", "onnx::Constant"):
        return node.t("value")
    raise RuntimeError(f"QDQ export: expected a constant scale / zero point, got {node.kind()}")


def _rank(value) -> int:
    t = value.type()
    r = t.dim() if hasattr(t, "dim") else None
    if r is None:
        raise RuntimeError("QDQ export: the rank of a per-channel quantized activation is unknown")
    return r


def hluq_float(x: torch.Tensor, fp_min, scale_log, scale_uni, levels_log: int, levels_uni: int) -> torch.Tensor:
    """HLUQ (:func:`ptq4sam.quantization.hluq_quantize`) with ONNX-exportable ops."""
    xs = x - fp_min
    n = torch.round(torch.log(torch.clamp(xs / scale_log, min=1e-30)) * (-1.0 / math.log(2.0)))
    log_val = (scale_log * torch.exp(torch.clamp(n, min=0.0, max=levels_log - 1) * -math.log(2.0)))
    log_val = log_val.masked_fill(n >= levels_log, 0.0)
    uni_val = scale_log + torch.clamp(torch.round((xs - scale_log) / scale_uni), 0.0, levels_uni - 1) * scale_uni
    return torch.where(xs <= scale_log, log_val, uni_val) + fp_min


# ---- what each quantizer exports as -------------------------------------------------------------------------------
@dataclass
class QuantizerExport:
    name: str
    kind: str  # "activation-qdq" | "weight-dq" | "weight-float" | "emulated-agq" | "emulated-hluq" | "emulated-lnq"
    bits: int
    dtype: str  # "uint8" | "int8" | "float"
    per_channel: bool


def _int_dtype(qmin: int, qmax: int, name: str) -> torch.dtype:
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    raise InputError(f"ONNX export: quantizer '{name}' has integer range [{qmin}, {qmax}]; QDQ export supports up to "
                     "8 bits (uint8 / int8)")


def _act_forward(q: FakeQuantizeBase, name: str, records: List[QuantizerExport]):
    if isinstance(q, AGQFakeQuantize):
        scale = q._eval_params()[0].reshape(())
        records.append(QuantizerExport(name, "emulated-agq", q.bit, "float", False))
        return lambda x: agq_reference(x, scale, q.tau, q.levels)
    if isinstance(q, LNQFakeQuantize):
        scale = q._eval_params()[0].reshape(())
        records.append(QuantizerExport(name, "emulated-lnq", q.bit, "float", False))
        return lambda x: lnq_reference(x, scale, q.lnq_alpha, q.max_code)
    if isinstance(q, HLUQFakeQuantize):
        params = q._eval_params()
        records.append(QuantizerExport(name, "emulated-hluq", q.bit, "float", bool(q.group.numel())))
        if not q.group.numel():
            fp_min, s_log, s_uni = (t.reshape(()) for t in params)
            return lambda x: hluq_float(x, fp_min, s_log, s_uni, q.levels_log, q.levels_uni)
        return lambda x: hluq_float(x, *(per_channel(t, q.group, x, q.ch_axis) for t in params), q.levels_log,
                                    q.levels_uni)
    if not q.uniform:
        raise InputError(f"ONNX export: no QDQ form for quantizer '{name}' ({type(q).__name__})")
    scale, zp = q._eval_params()
    dt = _int_dtype(q.quant_min, q.quant_max, name)
    scale, zp = scale.float().reshape(-1), zp.to(dt).reshape(-1)
    clip = (q.quant_min, q.quant_max) != ((0, 255) if dt == torch.uint8 else (-128, 127))
    records.append(QuantizerExport(name, "activation-qdq", q.bit, str(dt).replace("torch.", ""), q.ch_axis != -1))

    def fwd(x):
        axis = -1 if q.ch_axis == -1 else q.ch_axis % x.dim()
        return _ActQDQ.apply(x, scale, zp, q.quant_min, q.quant_max, axis, clip)
    return fwd


@torch.no_grad()
def integer_weight(layer: _QuantWeightMixin, unsigned: bool = False):
    """(integers, scale, zero point, axis) with ``(q - zp) * scale`` == the weight our fake quantizer produces.

    ``q - zp`` is stored as int8 with zero point 0 when it fits (symmetric form), else ``q`` as uint8 / int8.
    ``unsigned``: ``q - zp`` that fits int8 is stored as uint8 ``q - zp + 128`` with zero point 128 instead (the same
    values; runtimes then multiply uint8 by uint8, see :func:`export_sam`)."""
    wq = layer.weight_quantizer
    got = integer_grid(layer)
    if got is None:
        raise InputError(f"ONNX export: the quantized weight of '{getattr(wq, 'qname', '?')}' is not on its integer "
                         "grid (AdaRound not hardened? quantize with the toolkit's evaluation state)")
    q, scale, zp, axis = got
    d = q - zp.reshape(_bshape(q, axis) if axis != -1 else [1] * q.dim()).to(q)
    scale = scale.float().reshape(-1)
    if d.min() >= -128 and d.max() <= 127:
        if unsigned:
            return (d + 128).to(torch.uint8), scale, torch.full_like(zp.reshape(-1), 128, dtype=torch.uint8), axis
        return d.to(torch.int8), scale, torch.zeros_like(zp.reshape(-1), dtype=torch.int8), axis
    dt = _int_dtype(wq.quant_min, wq.quant_max, getattr(wq, "qname", "?"))
    return q.to(dt), scale, zp.reshape(-1).to(dt), axis


def _integer_weight_recorded(layer, name: str, records: List[QuantizerExport], unsigned: bool = False):
    """:func:`integer_weight`, listed in ``records``."""
    q, scale, zp, axis = integer_weight(layer, unsigned)
    records.append(QuantizerExport(name, "weight-dq", layer.weight_quantizer.bit, str(q.dtype).replace("torch.", ""),
                                   axis != -1))
    return q, scale, zp, axis


def _float_weight(layer, name: str, records: List[QuantizerExport]) -> torch.Tensor:
    """The layer's quantized weight as the float values of its grid, ``(q - z) * s`` (a constant of the traced graph:
    no DequantizeLinear; 4x the bytes of int8), listed in ``records``."""
    q, scale, zp, axis = integer_weight(layer)
    records.append(QuantizerExport(name, "weight-float", layer.weight_quantizer.bit, "float", axis != -1))
    return _WeightDQ.forward(None, q, scale, zp, axis)


def _weight_forward(layer, name: str, records: List[QuantizerExport], float_weight: bool = False):
    """A convolution's weight quantizer: DequantizeLinear of the integer weight, or (``float_weight``) the float values
    of its grid, for a runtime that would otherwise dequantize a weight with float inputs at every run."""
    if float_weight:
        w = _float_weight(layer, name, records)
        return lambda _: w
    q, scale, zp, axis = _integer_weight_recorded(layer, name, records)
    return lambda w: _WeightDQ.apply(q, scale, zp, axis)


def _linear_forward(layer: QuantLinear, name: str, records: List[QuantizerExport], unsigned: bool = False,
                    float_weight: bool = False):
    """Linear as ``MatMul(DQ(x), DQ(w^T)) + b`` with the integer weight stored transposed (the exporter's
    ``MatMul(x, Transpose(DQ(w)))`` hides the weight's DQ from the runtimes' QDQ fusions). ``float_weight``: the
    weight stored as the float values of its grid, ``(q - z) * s`` (no DequantizeLinear; 4x the bytes): a plain float
    MatMul for a runtime on a CPU where the integer or decompressing kernels are the slower ones."""
    if float_weight:
        w_t = _float_weight(layer, name, records).t().contiguous()

        def weight():
            return w_t
    else:
        q, scale, zp, axis = _integer_weight_recorded(layer, name, records, unsigned)
        q_t, axis_t = q.t().contiguous(), (-1 if axis == -1 else 1 - axis)

        def weight():
            return _WeightDQ.apply(q_t, scale, zp, axis_t)
    bias = layer.bias

    def fwd(x):
        y = torch.matmul(layer.input_quant(x), weight())
        return y if bias is None else y + bias
    return fwd


@contextmanager
def export_mode(sam: nn.Module, u8_linear_weights: bool = False, float_linear_weights: bool = False,
                float_conv_weights: bool = False):
    """Quantizers of ``sam`` (in its evaluation state) emit QDQ nodes while tracing; yields the list of
    :class:`QuantizerExport` records, one per quantizer. ``u8_linear_weights``: Linear weights as uint8 (zero point
    128) where they would be int8; ``float_linear_weights``: as the float values of their grid;
    ``float_conv_weights``: the convolutions' weights as the float values of their grid."""
    records: List[QuantizerExport] = []
    patched = []
    weight_q = {}  # id(weight quantizer) -> its layer
    for m in sam.modules():
        if isinstance(m, _QuantWeightMixin):
            m.unfreeze()  # the frozen-weight shortcut would bypass the weight quantizer's export form
            if m.weight_quantizer is not None and m.weight_quantizer.fake_quant_enabled:
                weight_q[id(m.weight_quantizer)] = m
    try:
        for name, q in sam.named_modules():
            if not isinstance(q, FakeQuantizeBase) or not q.fake_quant_enabled:
                continue
            if q.drop_prob < 1.0 or q.observer_enabled:
                raise InputError(f"ONNX export: quantizer '{name}' is not in the evaluation state (drop_prob="
                                 f"{q.drop_prob}, observing={q.observer_enabled})")
            if not q.initialized:
                raise InputError(f"ONNX export: quantizer '{name}' was never calibrated")
            if isinstance(q, AdaRoundFakeQuantize) and q.alpha is not None and not q.hard:
                raise InputError(f"ONNX export: AdaRound quantizer '{name}' is not hardened")
            if id(q) in weight_q:
                layer = weight_q[id(q)]
                if isinstance(layer, QuantLinear):
                    layer.forward = _linear_forward(layer, name, records, u8_linear_weights, float_linear_weights)
                    patched.append(layer)
                    continue
                fwd = _weight_forward(layer, name, records, float_conv_weights)
            else:
                fwd = _act_forward(q, name, records)
            q.forward = fwd  # instance attribute: nn.Module.__call__ uses it
            patched.append(q)
        yield records
    finally:
        for m in patched:
            del m.forward


# ---- the two graphs ------------------------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    def __init__(self, sam):
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image):
        return self.image_encoder(image)


class DecoderGraph(nn.Module):
    """Prompt encoder (boxes only) + mask decoder with ``multimask_output=False``, written with ``expand`` instead of
    ``repeat_interleave`` (one image per call), so the number of boxes is a dynamic axis. Computes what
    ``BoxPromptSegmenter.decode`` computes (tested)."""

    def __init__(self, sam):
        super().__init__()
        self.pe = sam.prompt_encoder
        self.dec = sam.mask_decoder
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def forward(self, image_embeddings, boxes):
        pe, dec = self.pe, self.dec
        n = boxes.shape[0]
        coords = (boxes + 0.5).reshape(-1, 2, 2)
        h_in, w_in = pe.input_image_size
        coords = coords / torch.tensor([w_in, h_in], dtype=coords.dtype)
        corners = pe.pe_layer._pe_encoding(coords)
        sparse = torch.cat([corners[:, :1] + pe.point_embeddings[2].weight, corners[:, 1:] + pe.point_embeddings[3].weight],
                           dim=1)
        h, w = pe.image_embedding_size
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat((tokens, sparse), dim=1)
        src = image_embeddings.expand(n, -1, -1, -1) + dense
        pos = self.image_pe.expand(n, -1, -1, -1)
        b, c = src.shape[0], src.shape[1]
        hs, src = dec.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_token = hs[:, 1, :]  # multimask_output=False: the first mask token only
        src = src.transpose(1, 2).reshape(b, c, h, w)
        up = dec.output_upscaling(src)
        hyper = dec.output_hypernetworks_mlps[0](mask_token).unsqueeze(1)
        b2, c2, h2, w2 = up.shape
        masks = (hyper @ up.reshape(b2, c2, h2 * w2)).reshape(b2, 1, h2, w2)
        iou = dec.iou_prediction_head(iou_token_out)[:, :1]
        return masks, iou


@dataclass
class ExportResult:
    out_dir: Path
    manifest: Dict


def _export_one(module: nn.Module, args, path: Path, input_names, output_names, dynamic_axes, opset: int = OPSET,
                int4: Optional[Dict] = None):
    """One graph; ``int4`` (a dict): its int8 weights that fit INT4 stored packed (``int4.pack_int4_weights``' counts
    go into the dict)."""
    import warnings  # noqa: PLC0415

    from .int4 import pack_int4_weights  # noqa: PLC0415

    def write(tmp):
        torch.onnx.export(module, args, tmp, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        if int4 is not None:
            int4.update(pack_int4_weights(Path(tmp)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        atomic_write(path, write)


@torch.no_grad()
def export_sam(sam: nn.Module, out_dir, img_size: int, q_config: Optional[Dict] = None,
               quant_encoder: Optional[bool] = None, info: Optional[Dict] = None, parts=("encoder", "decoder"),
               example_boxes: int = 2, int4_weights: bool = False, u8_linear_weights: bool = False,
               float_linear_weights: bool = False, float_conv_weights: bool = False) -> ExportResult:
    """Export ``sam`` (float, or quantized in its evaluation state) as ONNX graphs into ``out_dir``.
    ``int4_weights``: integer weights that fit 4 bits stored as packed INT4 (opset 21; :mod:`.int4`).
    ``u8_linear_weights``: the Linear layers' weights stored as uint8 with zero point 128 (the same values): on a CPU
    without int8 dot products (AVX2 without VNNI) ONNX Runtime and OpenVINO multiply uint8 activations by int8 weights
    with an instruction whose pairwise sums saturate at 16 bits (masks off by ~0.5 % of pixels in LiteMedSAM's
    decoder), uint8 by uint8 without saturation; the convolutions keep int8 weights (OpenVINO runs them in int8 only
    with symmetric weights). ``float_linear_weights``: the Linear layers' weights stored as the float values of their
    grid (the same values; 4x the bytes): on such a CPU a float MatMul beats the integer / decompressing kernels, which
    with float Linear inputs (q_config ``inputs.linear: float``) leaves the int8 kernels to the convolutions.
    ``float_conv_weights``: the convolutions' weights stored so (for float convolution inputs, ``inputs.conv:
    float``: the runtimes then run plain float convolutions instead of dequantizing the weights at every run)."""
    from .int4 import EXPORT_OPSET, INT4_OPSET  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sam = sam.eval().cpu()
    image = torch.zeros(1, 3, img_size, img_size)
    t0 = time.time()
    opset = EXPORT_OPSET if int4_weights else OPSET
    packed: Dict[str, Dict] = {}
    chosen = [k for k, v in (("int4_weights", int4_weights), ("u8_linear_weights", u8_linear_weights),
                              ("float_linear_weights", float_linear_weights)) if v]
    if len(chosen) > 1:
        raise InputError(f"ONNX export: {' and '.join(chosen)} are exclusive (each says how the Linear weights are "
                         "stored: packed INT4, uint8, float)")
    with export_mode(sam, u8_linear_weights, float_linear_weights, float_conv_weights) as records:
        files = {}
        if "encoder" in parts:
            _export_one(EncoderGraph(sam), (image,), out_dir / ENCODER_FILE, ["image"], ["image_embeddings"], None,
                        opset, packed.setdefault("encoder", {}) if int4_weights else None)
            files["encoder"] = ENCODER_FILE
        if "decoder" in parts:
            feats = sam.image_encoder(image)  # eager: the decoder's example input
            s = img_size
            boxes = torch.tensor([[0.1 * s, 0.2 * s, 0.6 * s, 0.7 * s]] * example_boxes)
            _export_one(DecoderGraph(sam), (feats, boxes), out_dir / DECODER_FILE, ["image_embeddings", "boxes"],
                        ["low_res_masks", "iou"], {"boxes": {0: "num_boxes"}, "low_res_masks": {0: "num_boxes"},
                                                   "iou": {0: "num_boxes"}},
                        opset, packed.setdefault("decoder", {}) if int4_weights else None)
            files["decoder"] = DECODER_FILE
    kinds: Dict[str, int] = {}
    for r in records:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    manifest = write_manifest(
        out_dir, files, img_size, q_config, quant_encoder, quantizers=dict(sorted(kinds.items())),
        integer_kernels="activations and weights of Linear / Conv layers and attention matmuls as QDQ pairs "
                        "(the runtime fuses them into integer kernels)",
        emulated=sorted(r.name for r in records if r.kind.startswith("emulated")),
        quantizer_list=[r.__dict__ for r in records], info=info or {}, torch=torch.__version__,
        export_s=round(time.time() - t0, 2), opset=INT4_OPSET if int4_weights else OPSET, int4_weights=packed,
        u8_linear_weights=u8_linear_weights, float_linear_weights=float_linear_weights,
        float_conv_weights=float_conv_weights)
    return ExportResult(out_dir, manifest)


def write_manifest(out_dir: Path, files: Dict[str, str], img_size: int, q_config: Optional[Dict],
                   quant_encoder: Optional[bool], **fields) -> Dict:
    """``export.json`` of a folder of graphs (ours or a peer's): format, graph files and their size on disk (an
    OpenVINO ``.xml`` counts with its ``.bin``), the quantization that made them and ``fields``."""
    manifest = {"format": EXPORT_FORMAT, "opset": fields.pop("opset", OPSET), "img_size": img_size, "files": files,
                "file_bytes": {k: sum(p.stat().st_size for p in out_dir.glob(Path(f).stem + ".*")
                                      if p.suffix in (".onnx", ".xml", ".bin")) for k, f in files.items()},
                "quantized": q_config is not None, "q_config": q_config, "quant_encoder": quant_encoder,
                "quantizers": {}, "emulated": [], **fields}
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(onnx_dir) -> Dict:
    p = Path(onnx_dir) / MANIFEST_FILE
    if not p.is_file():
        raise InputError(f"--onnx {onnx_dir}: no {MANIFEST_FILE} there (export with tools/export_onnx.py)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not JSON ({e})") from None
    if m.get("format") != EXPORT_FORMAT:
        raise InputError(f"{p}: format {m.get('format')!r}, expected {EXPORT_FORMAT!r}")
    for part, f in m.get("files", {}).items():
        if not (Path(onnx_dir) / f).is_file():
            raise InputError(f"--onnx {onnx_dir}: the {part} graph {f} listed in {MANIFEST_FILE} is missing")
    return m
