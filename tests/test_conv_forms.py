"""The ONNX Runtime forms of a quantized convolution (ptq4sam.deploy.conv_forms) against a float64 reference."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ptq4sam.deploy.conv_forms import (
    conv_output_ranges,
    quantized_convs,
    uint8_grid,
    with_conv_integer,
    with_float_weights,
    with_output_qdq,
)

SX, ZX = np.float32(0.04), np.uint8(120)
RNG = np.random.default_rng(0)
# 7-bit weights: on a CPU without int8 dot products QLinearConv's uint8 x int8 pair sums saturate at 16 bits with
# full-range weights (2 x 255 x 127 > 32767; docs/deploy.md), 2 x 255 x 63 does not
W_DENSE = RNG.integers(-63, 64, (6, 8, 3, 3)).astype(np.int8)  # per-output-channel symmetric
S_DENSE = (RNG.random(6) * 0.01 + 0.002).astype(np.float32)
B_DENSE = RNG.standard_normal(6).astype(np.float32)
W_DW = RNG.integers(-63, 64, (8, 1, 3, 3)).astype(np.int8)  # depthwise
S_DW = (RNG.random(8) * 0.02 + 0.002).astype(np.float32)
W_FLOAT = RNG.standard_normal((4, 8, 1, 1)).astype(np.float32)


def _graph() -> onnx.ModelProto:
    """x -> QDQ -> a dense 3x3 conv (bias) and a depthwise 3x3 conv (no bias), both with DequantizeLinear weights;
    and a float 1x1 conv of x (not quantized: left alone)."""
    init = [numpy_helper.from_array(v, k) for k, v in {
        "sx": SX, "zx": ZX, "wd": W_DENSE, "sd": S_DENSE, "zd": np.zeros(6, np.int8), "bd": B_DENSE,
        "ww": W_DW, "sw": S_DW, "zw": np.zeros(8, np.int8), "wf": W_FLOAT}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wd", "sd", "zd"], ["wdf"], axis=0),
             helper.make_node("DequantizeLinear", ["ww", "sw", "zw"], ["wwf"], axis=0),
             helper.make_node("Conv", ["xd", "wdf", "bd"], ["dense"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["xd", "wwf"], ["dw"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Conv", ["x", "wf"], ["flt"])]
    vi = lambda n, c: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, 10, 10])  # noqa: E731
    g = helper.make_graph(nodes, "g", [vi("x", 8)], [vi("dense", 6), vi("dw", 8), vi("flt", 4)], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run(m: onnx.ModelProto, x: np.ndarray, optimized=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _reference(x: np.ndarray):
    """float64: the input on its uint8 grid, the dequantized weights, the convolutions."""
    xd = (np.clip(np.round(x / SX) + ZX, 0, 255) - ZX) * np.float64(SX)
    t = torch.from_numpy(xd)
    dense = torch.nn.functional.conv2d(t, torch.from_numpy(W_DENSE * S_DENSE.astype(np.float64)[:, None, None, None]),
                                       torch.from_numpy(B_DENSE.astype(np.float64)), padding=1)
    dw = torch.nn.functional.conv2d(t, torch.from_numpy(W_DW * S_DW.astype(np.float64)[:, None, None, None]),
                                    padding=1, groups=8)
    return dense.numpy(), dw.numpy()


X = (RNG.standard_normal((1, 8, 10, 10)) * 2).astype(np.float32)


def test_the_quantized_convolutions_are_found_and_the_float_one_left_alone():
    convs = quantized_convs(_graph().graph)
    assert [c.node.output[0] for c in convs] == ["dense", "dw"]
    assert convs[0].x_q == "xq" and float(convs[0].x_scale) == SX and convs[0].bias is not None and convs[1].bias is None


@pytest.mark.parametrize("form", [with_float_weights, with_conv_integer])
def test_exact_forms_compute_the_exported_convolutions(form):
    """Folded float weights and ConvInteger (integer accumulation, then s_x * s_w) give the float64 reference to
    float32 rounding, as the exported graph does; the float conv is untouched."""
    m = _graph()
    ref = _reference(X)
    exported = _run(m, X)
    got = _run(form(m), X)
    for a, b, r in zip(got[:2], exported[:2], ref):
        np.testing.assert_allclose(b, r, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-4)
    assert np.array_equal(got[2], exported[2])
    if form is with_conv_integer:
        assert sum(n.op_type == "ConvInteger" for n in form(m).graph.node) == 2


def test_conv_integer_refuses_per_channel_weight_zero_points():
    m = _graph()
    for t in m.graph.initializer:
        if t.name == "zd":
            t.CopyFrom(numpy_helper.from_array(np.arange(6, dtype=np.int8), "zd"))
    with pytest.raises(ValueError, match="per-channel non-zero"):
        with_conv_integer(m)


def test_output_qdq_form_fuses_into_qlinearconv_within_half_an_output_step(tmp_path):
    m = _graph()
    ranges = conv_output_ranges(m, [{"x": X}])
    ref = _reference(X)
    assert ranges["dense"] == pytest.approx((float(ref[0].min()), float(ref[0].max())), abs=1e-4)
    q = with_output_qdq(m, ranges)
    got = _run(q, X, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("Conv") == 1  # the float conv stays float
    for a, r, name in zip(got[:2], ref, ("dense", "dw")):
        s, _ = uint8_grid(*ranges[name])
        # one output rounding (half a step) plus the int32 bias rounding (half of s_x * s_w, far smaller)
        assert np.abs(a - r).max() <= 0.5 * s + 1e-3


def test_uint8_grid_holds_zero_and_the_range():
    s, z = uint8_grid(0.5, 2.0)  # a positive range still holds 0
    assert z == 0 and s == pytest.approx(2.0 / 255)
    s, z = uint8_grid(-1.0, 3.0)
    assert s == pytest.approx(4.0 / 255) and z == round(1.0 / (4.0 / 255))
    assert uint8_grid(0.0, 0.0) == (1.0, 0)


def _per_channel_graph() -> onnx.ModelProto:
    """x -> per-channel uint8 QDQ (axis 1, zero points 3..) -> depthwise 3x3 conv (bias); and the same kind of QDQ
    feeding a dense conv (not depthwise: left alone)."""
    init = [numpy_helper.from_array(v, k) for k, v in {
        "s": S_PC, "z": Z_PC, "ww": W_DW, "sw": S_DW, "zw": np.zeros(8, np.int8), "b": B_PC,
        "wd": W_DENSE, "sd": S_DENSE, "zd": np.zeros(6, np.int8)}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], axis=1),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], axis=1),
             helper.make_node("DequantizeLinear", ["ww", "sw", "zw"], ["wwf"], axis=0),
             helper.make_node("Conv", ["xd", "wwf", "b"], ["dw"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq2"], axis=1),
             helper.make_node("DequantizeLinear", ["xq2", "s", "z"], ["xd2"], axis=1),
             helper.make_node("DequantizeLinear", ["wd", "sd", "zd"], ["wdf"], axis=0),
             helper.make_node("Conv", ["xd2", "wdf"], ["dense"], pads=[1, 1, 1, 1])]
    vi = lambda n, c: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, 10, 10])  # noqa: E731
    g = helper.make_graph(nodes, "g", [vi("x", 8)], [vi("dw", 8), vi("dense", 6)], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


S_PC = (RNG.random(8) * 0.05 + 0.01).astype(np.float32)
Z_PC = np.arange(3, 11, dtype=np.uint8) * 9
B_PC = RNG.standard_normal(8).astype(np.float32)


def _with_outputs(m: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(m.SerializeToString())
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return m


def test_per_channel_depthwise_inputs_become_integer_arithmetic_with_the_same_grid_indices():
    """The rewritten depthwise input holds exactly the grid indices q - z_c of ONNX Runtime's per-channel
    QuantizeLinear (random values and values on rounding ties, out of range on both sides), its convolution the
    float64 reference; the dense conv's per-channel QDQ is left alone."""
    from ptq4sam.deploy.conv_forms import fold_depthwise_input_qdq

    m = _per_channel_graph()
    r, n = fold_depthwise_input_qdq(m)
    assert n == 1 and fold_depthwise_input_qdq(r) == (r, 0)  # nothing left to rewrite
    assert [nd.output[0] for nd in r.graph.node if nd.op_type == "QuantizeLinear"] == ["xq2"]
    assert [nd.op_type for nd in r.graph.node][:4] == ["Div", "Round", "Max", "Min"]
    k = RNG.integers(-140, 140, X.shape).astype(np.float32)
    ties = ((k + 0.5) * S_PC[None, :, None, None]).astype(np.float32)  # x / s_c on (or next to) a half
    for x in (X * 3, ties):
        before = _run(_with_outputs(m, ["xd"]), x)
        after = _run(_with_outputs(r, ["dw_input3_r"]), x)
        idx = np.round(before[2] / S_PC[None, :, None, None]).astype(np.float32)  # (q - z_c) of the original graph
        assert np.array_equal(after[2], idx)
        xd = idx.astype(np.float64) * S_PC.astype(np.float64)[None, :, None, None]
        ref = torch.nn.functional.conv2d(torch.from_numpy(xd),
                                         torch.from_numpy(W_DW * S_DW.astype(np.float64)[:, None, None, None]),
                                         torch.from_numpy(B_PC.astype(np.float64)), padding=1, groups=8).numpy()
        np.testing.assert_allclose(before[0], ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(after[0], ref, rtol=1e-5, atol=1e-4)
        assert np.array_equal(after[1], before[1])


def test_a_depthwise_qdq_read_elsewhere_is_left_alone():
    from ptq4sam.deploy.conv_forms import fold_depthwise_input_qdq

    m = _per_channel_graph()
    m.graph.output.append(helper.make_tensor_value_info("xq", TensorProto.UINT8, None))  # q also a graph output
    assert fold_depthwise_input_qdq(m) == (m, 0)


@pytest.mark.parametrize("graph", ["per-tensor input", "per-channel input"])
def test_float_convolutions_read_the_unquantized_input_and_the_dequantized_weights(graph):
    """Every quantized convolution (per-tensor or per-channel input QDQ) computes the float64 convolution of the
    graph's float input with its dequantized weight; the float conv is untouched; no quantization is left."""
    from ptq4sam.deploy.conv_forms import with_float_convs

    m = _graph() if graph == "per-tensor input" else _per_channel_graph()
    r, n = with_float_convs(m)
    assert n == 2 and with_float_convs(r)[1] == 0
    assert not [nd.op_type for nd in r.graph.node if "Quantize" in nd.op_type]
    t = torch.from_numpy(X.astype(np.float64))
    dw_bias = None if graph == "per-tensor input" else torch.from_numpy(B_PC.astype(np.float64))
    dense_bias = torch.from_numpy(B_DENSE.astype(np.float64)) if graph == "per-tensor input" else None
    ref = {"dense": torch.nn.functional.conv2d(t, torch.from_numpy(W_DENSE * S_DENSE.astype(np.float64)[:, None, None, None]),
                                               dense_bias, padding=1).numpy(),
           "dw": torch.nn.functional.conv2d(t, torch.from_numpy(W_DW * S_DW.astype(np.float64)[:, None, None, None]),
                                            dw_bias, padding=1, groups=8).numpy()}
    got = dict(zip([o.name for o in r.graph.output], _run(r, X)))
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5)
    if graph == "per-tensor input":
        assert np.array_equal(got["flt"], _run(m, X)[2])
