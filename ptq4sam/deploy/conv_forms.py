"""Forms of our quantized convolutions for ONNX Runtime, as rewrites of an exported graph, to measure which one its
CPU kernels run fastest.

Our export (:mod:`ptq4sam.deploy.onnx_export`) writes a quantized convolution as the paper quantizes it: a QDQ pair
on the layer's input and a DequantizeLinear on its integer weight, then a float ``Conv``. ONNX Runtime fuses
``DQ -> Conv -> Q`` into ``QLinearConv`` only with a QuantizeLinear on the output, so these convolutions run in float
on dequantized values. The forms below are the alternatives, each applied to every convolution whose input is a
per-tensor QDQ and whose weight a DequantizeLinear of a constant:

- ``exported``: the graph as it is;
- ``float weights``: the weight's DequantizeLinear folded into a float constant (the same values; the runtime no
  longer dequantizes the weight at every run and may pick its blocked-layout float kernels);
- ``ConvInteger``: ``ConvInteger(x_q, w_q) -> Cast -> Mul(s_x * s_w) -> Add(bias)``, the same arithmetic with an
  integer accumulation (exact, up to the float rounding of the final scaling);
- ``float convolutions`` (:func:`with_float_convs`): every quantized convolution in float, its input not quantized
  (another model: what the quantized convolutions cost against float ones);
- ``output QDQ``: a QuantizeLinear / DequantizeLinear on each convolution's output (uint8, range from running the
  graph on the given inputs) and the bias as int32 on the grid ``s_x * s_w``: the pattern ONNX Runtime fuses into
  ``QLinearConv``. This changes the model (one more rounding per convolution); it is a speed probe, not a model our
  torch pipeline simulates.

``tools/ort_conv_forms.py`` times them against the FP32 graph on this machine.

:func:`fold_depthwise_input_qdq` is not a form but what our ONNX Runtime runner does to every graph it loads
(:class:`ptq4sam.deploy.runtime._OrtGraph`): ONNX Runtime quantizes a per-channel activation (our depthwise
convolutions' inputs, ``depthwise_act_per_channel``) in a scalar loop (30 % of a W8A8 LiteMedSAM encoder's time:
docs/deploy.md). The same quantization in per-channel elementwise operators --
``Div(s_c) -> Round -> Max(-z_c) -> Min(255 - z_c)`` -- gives the grid indices ``q - z_c`` (QuantizeLinear's
``x / s``, its round half to even and its saturation, with every value after the ``Round`` an integer), and ``s_c``
moves into the depthwise weight's per-channel scale (a depthwise convolution's output channel c reads input channel
c only; its zero padding is ``q - z_c = 0``). The convolution's input is the graph's exactly; the only difference is
the float rounding of ``s_w * s_c`` against ``(q_w * s_w) * s_c`` inside the convolution."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_graph import attr, constants


@dataclass
class QuantConv:
    node: onnx.NodeProto
    x_q: str  # the QuantizeLinear output the input DequantizeLinear reads
    x_scale: np.ndarray
    x_zero: np.ndarray
    w_q: np.ndarray
    w_scale: np.ndarray
    w_zero: np.ndarray
    w_axis: int
    bias: Optional[np.ndarray]


def quantized_convs(graph: onnx.GraphProto) -> List[QuantConv]:
    """The convolutions with a per-tensor QDQ input and a DequantizeLinear of a constant integer weight."""
    const = constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for n in graph.node:
        if n.op_type != "Conv":
            continue
        dqx, dqw = producer.get(n.input[0]), producer.get(n.input[1])
        if dqx is None or dqw is None or dqx.op_type != "DequantizeLinear" or dqw.op_type != "DequantizeLinear":
            continue
        sx = const.get(dqx.input[1])
        zx = const.get(dqx.input[2]) if len(dqx.input) > 2 else np.array(0, np.uint8)
        if sx is None or sx.ndim != 0 or zx is None or dqw.input[0] not in const:
            continue
        wq, sw = const[dqw.input[0]], const.get(dqw.input[1])
        zw = const.get(dqw.input[2]) if len(dqw.input) > 2 else np.zeros((), wq.dtype)
        bias = const.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if sw is None or zw is None or (sw.ndim and attr(dqw, "axis", 1) != 0):  # per output channel or per tensor
            continue
        out.append(QuantConv(n, dqx.input[0], sx, zx, wq, sw, zw, attr(dqw, "axis", 1), bias))
    return out


def _per_channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    if v.ndim:
        shape[axis] = -1
    return v.reshape(shape)


def dequantized_weight(c: QuantConv) -> np.ndarray:
    """``(w_q - z) * s`` as DequantizeLinear computes it (int32 difference, float32 product)."""
    return _dequantize(c.w_q, c.w_scale, c.w_zero, c.w_axis)


def _dequantize(w_q: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray], axis: int) -> np.ndarray:
    z = np.zeros((), np.int32) if zero is None else _per_channel(zero.astype(np.int32), w_q.ndim, axis)
    return (w_q.astype(np.int32) - z).astype(np.float32) * _per_channel(scale.astype(np.float32), w_q.ndim, axis)


def _rewrite(model: onnx.ModelProto, each: Callable[[QuantConv, str, onnx.GraphProto], List[onnx.NodeProto]]):
    """A copy of ``model`` in which ``each(conv, prefix, graph)`` gives the nodes that replace every quantized conv
    (and may add initializers to ``graph``)."""
    m = copy.deepcopy(model)
    g = m.graph
    convs = {c.node.output[0]: c for c in quantized_convs(g)}  # (protobuf hands out a new wrapper per access)
    nodes: List[onnx.NodeProto] = []
    for i, n in enumerate(g.node):
        c = convs.get(n.output[0]) if n.op_type == "Conv" else None
        nodes.extend(each(c, f"conv_form{i}_", g) if c is not None else [n])
    _keep_used(g, nodes)
    return m


def _keep_used(g: onnx.GraphProto, nodes: List[onnx.NodeProto]) -> None:
    """``g``'s nodes become those of ``nodes`` that a graph output depends on (what only the replaced convolutions
    read, e.g. their weights' DequantizeLinear, goes)."""
    used = {o.name for o in g.output}
    kept: List[onnx.NodeProto] = []
    for n in reversed(nodes):
        if any(o in used for o in n.output):
            kept.append(n)
            used.update(n.input)
    del g.node[:]
    g.node.extend(reversed(kept))


def _qdq_convs(g: onnx.GraphProto):
    """(param, [(conv, its input QuantizeLinear, DequantizeLinear, weight DequantizeLinear)]) for every Conv of ``g``
    that reads an activation QDQ pair and a dequantized weight; ``param(node, k)``: the constant value of input k (None
    when absent or not a constant)."""
    const = constants(g)
    producer = {o: n for n in g.node for o in n.output}

    def param(node, k):
        return const.get(node.input[k]) if len(node.input) > k and node.input[k] else None

    out = []
    for c in g.node:
        if c.op_type != "Conv":
            continue
        dq, dqw = producer.get(c.input[0]), producer.get(c.input[1])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and dqw is not None and dqw.op_type == "DequantizeLinear":
            out.append((c, q, dq, dqw))
    return param, out


def with_float_convs(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, int]:
    """``model`` with every convolution whose input is an activation QDQ (per tensor or per channel) and whose
    weight a DequantizeLinear of constants run in float: the QDQ's float input read directly and the weight folded
    into float constants (the q_config's ``inputs.conv: float`` with float-stored weights), and how many were
    changed. Another model (the convolutions' inputs are no longer rounded): a speed probe of what the quantized
    convolutions cost against float ones."""
    m = copy.deepcopy(model)
    g = m.graph
    param, convs = _qdq_convs(g)
    n_done = 0
    for i, (c, q, _, dqw) in enumerate(convs):
        w, ws = param(dqw, 0), param(dqw, 1)
        if w is None or ws is None or len(dqw.input) > 2 and dqw.input[2] and param(dqw, 2) is None:
            continue
        wf = _dequantize(w, ws, param(dqw, 2), attr(dqw, "axis", 1) % w.ndim)
        c.input[0], c.input[1] = q.input[0], _init(g, f"float_conv{i}_w", wf)
        n_done += 1
    _keep_used(g, list(g.node))
    return m, n_done


def _init(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def with_float_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    def each(c, p, g):
        n = copy.deepcopy(c.node)
        n.input[1] = _init(g, p + "w", dequantized_weight(c))
        return [n]
    return _rewrite(model, each)


def with_conv_integer(model: onnx.ModelProto) -> onnx.ModelProto:
    def each(c, p, g):
        if np.any(c.w_zero):
            raise ValueError(f"{c.node.name}: ConvInteger takes one weight zero point; this weight has per-channel "
                             "non-zero ones (export symmetric weights)")
        ci = helper.make_node("ConvInteger", [c.x_q, _init(g, p + "wq", c.w_q), _init(g, p + "xz", c.x_zero),
                                              _init(g, p + "wz", np.zeros((), c.w_q.dtype))], [p + "acc"])
        ci.attribute.extend(a for a in c.node.attribute)
        scale = (c.w_scale.astype(np.float32) * np.float32(c.x_scale)).reshape(1, -1, 1, 1)
        has_bias = c.bias is not None
        out = [ci, helper.make_node("Cast", [p + "acc"], [p + "f"], to=TensorProto.FLOAT),
               helper.make_node("Mul", [p + "f", _init(g, p + "s", scale)], [p + "m" if has_bias else c.node.output[0]])]
        if has_bias:
            b = _init(g, p + "b", c.bias.astype(np.float32).reshape(1, -1, 1, 1))
            out.append(helper.make_node("Add", [p + "m", b], [c.node.output[0]]))
        return out
    return _rewrite(model, each)


def conv_output_ranges(model: onnx.ModelProto, feeds: Sequence[Dict[str, np.ndarray]]) -> Dict[str, Tuple[float, float]]:
    """(min, max) of every quantized convolution's output over ``feeds``, from ONNX Runtime."""
    import onnxruntime as ort  # noqa: PLC0415

    m = copy.deepcopy(model)
    names = [c.node.output[0] for c in quantized_convs(m.graph)]
    for name in names:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    lo = {k: np.inf for k in names}
    hi = {k: -np.inf for k in names}
    for f in feeds:
        for k, v in zip(names, sess.run(names, f)):
            lo[k], hi[k] = min(lo[k], float(v.min())), max(hi[k], float(v.max()))
    return {k: (lo[k], hi[k]) for k in names}


def uint8_grid(lo: float, hi: float) -> Tuple[np.float32, np.uint8]:
    """Scale and zero point of an asymmetric uint8 grid that holds [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    return s, np.uint8(np.clip(np.round(-lo / s), 0, 255))


def with_output_qdq(model: onnx.ModelProto, ranges: Dict[str, Tuple[float, float]]) -> onnx.ModelProto:
    def each(c, p, g):
        n = copy.deepcopy(c.node)
        out = []
        if c.bias is not None:
            bs = (c.w_scale.astype(np.float32) * np.float32(c.x_scale)).astype(np.float32).reshape(-1)
            bs = np.broadcast_to(bs, c.bias.shape).copy()
            bq = np.round(c.bias.astype(np.float64) / bs).astype(np.int32)
            out.append(helper.make_node("DequantizeLinear", [_init(g, p + "bq", bq), _init(g, p + "bs", bs),
                                                             _init(g, p + "bz", np.zeros_like(bq))], [p + "b"], axis=0))
            n.input[2] = p + "b"
        y = n.output[0]
        s, z = uint8_grid(*ranges[y])
        n.output[0] = p + "y"
        s_name, z_name = _init(g, p + "ys", s), _init(g, p + "yz", z)
        return out + [n, helper.make_node("QuantizeLinear", [p + "y", s_name, z_name], [p + "yq"]),
                      helper.make_node("DequantizeLinear", [p + "yq", s_name, z_name], [y])]
    return _rewrite(model, each)


def forms(model: onnx.ModelProto, feeds: Sequence[Dict[str, np.ndarray]]) -> Dict[str, onnx.ModelProto]:
    """Every form of the module docstring (``feeds``: the inputs that set the output-QDQ ranges)."""
    return {"exported": model, "float weights": with_float_weights(model), "ConvInteger": with_conv_integer(model),
            "output QDQ": with_output_qdq(model, conv_output_ranges(model, feeds)),
            "float convolutions": with_float_convs(model)[0]}


def _depthwise(conv: onnx.NodeProto, w: np.ndarray) -> bool:
    return w.ndim == 4 and w.shape[1] == 1 and attr(conv, "group", 1) == w.shape[0] > 1


def fold_depthwise_input_qdq(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, int]:
    """``model`` with each per-channel uint8 activation QDQ that feeds a depthwise convolution alone rewritten as in
    the module docstring, and how many were rewritten (0: ``model`` itself is returned). A QDQ whose parameters are
    not constants, whose outputs something else also reads, or whose weight is not a per-channel DequantizeLinear of
    constants is left as it is."""
    g = model.graph
    readers: Dict[str, List[str]] = {o.name: ["<graph output>"] for o in g.output}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.output[0])
    param, convs = _qdq_convs(g)
    plans = {}  # conv output -> (quantize node, dequantize node, weight dequantize node)
    for c, q, dq, dqw in convs:
        s, z, w, ws = param(q, 1), param(q, 2), param(dqw, 0), param(dqw, 1)
        if (s is None or z is None or s.ndim != 1 or z.dtype != np.uint8 or w is None or ws is None
                or attr(q, "axis", 1) != 1 or attr(dq, "axis", 1) != 1 or attr(dqw, "axis", 1) != 0
                or not _depthwise(c, w) or s.shape[0] != w.shape[0] or ws.shape not in ((), (w.shape[0],))
                or len(dqw.input) > 2 and param(dqw, 2) is None
                or readers.get(q.output[0]) != [dq.output[0]] or readers.get(dq.output[0]) != [c.output[0]]
                or not np.array_equal(param(dq, 1), s) or not np.array_equal(param(dq, 2), z)):
            continue
        plans[c.output[0]] = (q, dq, dqw)
    if not plans:
        return model, 0
    m = copy.deepcopy(model)
    g = m.graph
    skip = {n.output[0] for q, dq, dqw in plans.values() for n in (q, dq)}
    skip |= {dqw.output[0] for out, (_, _, dqw) in plans.items() if readers.get(dqw.output[0]) == [out]}
    nodes: List[onnx.NodeProto] = []
    for i, n in enumerate(g.node):
        if n.output[0] in skip:
            continue
        if n.op_type != "Conv" or n.output[0] not in plans:
            nodes.append(n)
            continue
        q, dq, dqw = plans[n.output[0]]
        p = f"dw_input{i}_"
        s = param(q, 1).astype(np.float32)
        z = param(q, 2).astype(np.float32).reshape(1, -1, 1, 1)
        ws = param(dqw, 1).astype(np.float32) * s  # s_c moves into the weight's per-channel scale
        wz = param(dqw, 2)
        wz = np.zeros(ws.shape, param(dqw, 0).dtype) if wz is None else np.broadcast_to(wz, ws.shape).copy()
        conv = copy.deepcopy(n)
        conv.input[0], conv.input[1] = p + "r", p + "w"
        nodes += [helper.make_node("Div", [q.input[0], _init(g, p + "s", s.reshape(1, -1, 1, 1))], [p + "u"]),
                  helper.make_node("Round", [p + "u"], [p + "k"]),
                  helper.make_node("Max", [p + "k", _init(g, p + "lo", -z)], [p + "kl"]),
                  helper.make_node("Min", [p + "kl", _init(g, p + "hi", 255.0 - z)], [p + "r"]),
                  helper.make_node("DequantizeLinear", [dqw.input[0], _init(g, p + "ws", ws), _init(g, p + "wz", wz)],
                                   [p + "w"], axis=0),
                  conv]
    del g.node[:]
    g.node.extend(nodes)
    return m, len(plans)
