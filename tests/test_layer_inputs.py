"""``inputs.linear: float`` (weight-only Linear layers beside W8A8 convolutions) in the fake-quant model, in the
q_config checks, and in the exported graph with the Linear weights stored as the float values of their grid."""
import numpy as np
import onnx
import pytest
import torch
from test_attention_placement import _vit_b_w8a8

from ptq4sam.deploy.onnx_export import export_sam
from ptq4sam.deploy.onnx_graph import constants
from ptq4sam.deploy.runtime import _OrtGraph, open_graph
from ptq4sam.errors import InputError
from ptq4sam.methods.layer_inputs import label_note
from ptq4sam.qconfig import QConfigError, load_qconfig
from ptq4sam.quantization.qmodules import QuantConv2d, QuantLinear


def test_inputs_section_is_checked():
    with pytest.raises(QConfigError, match=r"inputs.linear.*'quantized', 'float'"):
        load_qconfig("exp/demo/config88.yaml", ["inputs.linear=none"])
    with pytest.raises(QConfigError, match=r"'inputs.linear' 'float' leaves every Linear input float.*ahcptq.HLUQ off"):
        load_qconfig("exp/demo/config88.yaml", ["inputs.linear=float", "ahcptq.HLUQ=true"])
    with pytest.raises(QConfigError, match=r"'inputs' linear and conv both 'float' with attention.placement 'float'"
                                           r".*a_qconfig.bit: null"):
        load_qconfig("exp/demo/config88.yaml", ["inputs.linear=float", "inputs.conv=float", "attention.placement=float",
                                                "ptq4sam.AGQ=false", "ptq4sam.BIG=false"])
    # with the paper's attention placement the attention's own points stay quantized: a valid setting
    load_qconfig("exp/demo/config88.yaml", ["inputs.linear=float", "inputs.conv=float"])
    # HLUQ / CAG given the convolutions still have something to quantize
    load_qconfig("exp/demo/config88.yaml", ["inputs.linear=float", "ahcptq.HLUQ=true", "ahcptq.convs=true"])
    # a run's label says which inputs stay float (the CLI's W8A8 line, read from a q_config or an export manifest)
    assert label_note(vars(load_qconfig("exp/recipes/w8a8-conv-deploy-cpu.yaml").inputs)) == " (linear inputs float)"
    assert label_note({"conv": "float"}) == " (conv inputs float)" and label_note({}) == ""


def _layers(seg, float_inputs):
    """(Linear layers, convolutions) of the quantized model; those of kind ``float_inputs`` have no input quantizer,
    the others an enabled one, and every one a quantized weight."""
    linears = [m for m in seg.sam.modules() if isinstance(m, QuantLinear)]
    convs = [m for m in seg.sam.modules() if isinstance(m, QuantConv2d)]
    assert linears and convs
    for m in linears + convs:
        assert m.weight_quantizer.fake_quant_enabled
        if isinstance(m, float_inputs):
            assert m.input_quant.quantizer is None
        else:
            assert m.input_quant.quantizer is not None and m.input_quant.quantizer.fake_quant_enabled
    return linears, convs


def _graph_outputs(folder, seg, sample):
    x = seg.prepare_image(sample.image).contiguous().numpy()
    boxes = seg.transform.apply_boxes_torch(torch.as_tensor(sample.boxes), sample.image.shape[:2]).numpy()
    feats = open_graph(folder / "encoder.onnx", "ort", 2)({"image": x})[0]
    masks = open_graph(folder / "decoder.onnx", "ort", 2)({"image_embeddings": feats, "boxes": boxes})[0]
    return x, boxes, feats, masks


@pytest.mark.parametrize("weights", ["per-channel", "per-tensor"])
def test_float_linear_inputs_in_torch_and_in_the_float_weight_export(tmp_path, weights):
    """Every Linear keeps a quantized weight and loses its input quantizer; every convolution keeps both. A Linear's
    output equals F.linear of the float input with the weight fake-quantized per channel by torch's own kernel. The
    export with ``float_linear_weights`` has no DequantizeLinear in front of any MatMul, its MatMul weights are the
    quantized weights as float values, and ONNX Runtime and OpenVINO compute the torch model's image embedding (up to
    float rounding: the only activation quantizers are on the convolutions' inputs, ahead of any MatMul) and ONNX
    Runtime its masks."""
    seg, sample, q = _vit_b_w8a8("float", ["inputs.linear=float"] + (["w_qconfig.ch_axis=-1"] if weights == "per-tensor"
                                                                      else []))
    linears, convs = _layers(seg, float_inputs=QuantLinear)
    lin = linears[len(linears) // 2]
    wq = lin.weight_quantizer
    x = torch.randn(3, 7, lin.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        if weights == "per-channel":
            w = torch.fake_quantize_per_channel_affine(lin.weight, wq.scale.reshape(-1), wq.zero_point.reshape(-1).int(),
                                                       0, wq.quant_min, wq.quant_max)
        else:
            w = torch.fake_quantize_per_tensor_affine(lin.weight, float(wq.scale), int(wq.zero_point), wq.quant_min,
                                                      wq.quant_max)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, lin.bias), rtol=1e-5, atol=1e-6)

    fl = tmp_path / "float_w"
    man = export_sam(seg.sam, fl, 64, q.to_dict(), True, float_linear_weights=True).manifest
    assert man["float_linear_weights"] and man["quantizers"]["weight-float"] == len(linears)
    assert man["quantizers"]["weight-dq"] == len(convs)
    assert man["quantizers"]["activation-qdq"] == len(convs)
    with torch.no_grad():
        want = [m.qweight().t().contiguous().numpy() for m in linears]
    n_weights = 0
    for part in ("encoder", "decoder"):
        graph = onnx.load(fl / f"{part}.onnx").graph
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        inits = constants(graph)  # initializers and Constant nodes
        matmuls = [n for n in graph.node if n.op_type == "MatMul"]
        assert matmuls and not [n.name for n in matmuls if "DequantizeLinear" in {made_by.get(i) for i in n.input}]
        weights = [inits[n.input[1]] for n in matmuls
                   if n.input[1] in inits and "positional_encoding" not in n.input[1]]  # the prompt encoder's own
        for got in weights:  # each one of the quantized weights, exactly
            assert any(got.shape == w_.shape and np.abs(got - w_).max() <= 1e-6 * np.abs(w_).max() for w_ in want)
        n_weights += len(weights)
    assert n_weights == len(linears)
    x_np, boxes, feats_ort, masks_ort = _graph_outputs(fl, seg, sample)
    with torch.no_grad():
        feats = seg.sam.image_encoder(torch.from_numpy(x_np))
        low, _ = seg.decode(feats, torch.as_tensor(sample.boxes), sample.image.shape[:2])
    np.testing.assert_allclose(feats_ort, feats.numpy(), rtol=1e-4, atol=1e-4)
    # per tensor, this random model's full-range conv weights saturate OpenVINO's u8 x s8 pair sums on CPUs without
    # VNNI (docs/deploy.md, "The same saturation in OpenVINO's int8 convolutions")
    if weights == "per-channel":
        feats_ov = open_graph(fl / "encoder.onnx", "openvino", 2)({"image": x_np})[0]
        np.testing.assert_allclose(feats_ov, feats.numpy(), rtol=1e-4, atol=1e-4)
    assert ((masks_ort > 0) == (low.numpy() > 0)).mean() >= 0.999
    with pytest.raises(InputError, match="u8_linear_weights and float_linear_weights are exclusive"):
        export_sam(seg.sam, tmp_path / "x", 64, q.to_dict(), True, u8_linear_weights=True, float_linear_weights=True)


def test_float_conv_inputs_in_torch_and_in_the_export(tmp_path):
    """``inputs.conv: float``: every convolution keeps its quantized weight and loses its input quantizer; every
    Linear keeps both. A convolution's output equals F.conv2d of the float input with its quantized weight. In the
    exported graph no convolution reads a DequantizeLinear, ONNX Runtime runs every encoder Linear as an integer
    kernel (MatMulIntegerToFloat) and computes the torch model's masks (on >= 99 % of pixels; the decoder alone from
    the torch model's image embedding on >= 99.9 %, as test_export's W8A8 LiteMedSAM). With ``float_conv_weights``
    the convolutions read float constants, the quantized weights, and compute the same image embedding."""
    seg, sample, q = _vit_b_w8a8("float", ["inputs.conv=float"])
    linears, convs = _layers(seg, float_inputs=QuantConv2d)
    conv = convs[-1]
    x = torch.randn(1, conv.in_channels, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the float input reaches the convolution of the quantized weight
        want = torch.nn.functional.conv2d(x, conv.qweight(), conv.bias, conv.stride, conv.padding, conv.dilation,
                                          conv.groups)
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(conv.qweight(), conv.weight)
    out = tmp_path / "g"
    man = export_sam(seg.sam, out, 64, q.to_dict(), True, u8_linear_weights=True).manifest
    assert man["quantizers"]["activation-qdq"] == len(linears) and man["quantizers"]["weight-dq"] == len(linears) + len(convs)
    for part in ("encoder", "decoder"):
        graph = onnx.load(out / f"{part}.onnx").graph
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        assert not [n.name for n in graph.node if n.op_type == "Conv" and made_by.get(n.input[0]) == "DequantizeLinear"]
    opt = tmp_path / "encoder_opt.onnx"
    _OrtGraph(out / "encoder.onnx", 2, optimized_path=opt)
    ops = [n.op_type for n in onnx.load(opt).graph.node]
    n_encoder_linears = sum(1 for m in seg.sam.image_encoder.modules() if isinstance(m, QuantLinear))
    assert ops.count("MatMulIntegerToFloat") == n_encoder_linears and "QLinearConv" not in ops
    x_np, boxes, feats_ort, masks_ort = _graph_outputs(out, seg, sample)
    with torch.no_grad():
        feats = seg.sam.image_encoder(torch.from_numpy(x_np))
        low, _ = seg.decode(feats, torch.as_tensor(sample.boxes), sample.image.shape[:2])
    # (quantized activations: a value next to a rounding tie may take the neighbouring step in one of the two)
    assert ((masks_ort > 0) == (low.numpy() > 0)).mean() >= 0.99
    dec = open_graph(out / "decoder.onnx", "ort", 2)({"image_embeddings": feats.numpy(), "boxes": boxes})[0]
    assert ((dec > 0) == (low.numpy() > 0)).mean() >= 0.999
    # the convolution weights stored as the float values of their grid: no DequantizeLinear before any Conv, each
    # weight the quantized one, and the same image embedding as the integer-weight graph's (up to float rounding)
    fc = tmp_path / "float_conv"
    man = export_sam(seg.sam, fc, 64, q.to_dict(), True, u8_linear_weights=True, float_conv_weights=True).manifest
    assert man["float_conv_weights"] and man["quantizers"]["weight-float"] == len(convs)
    assert man["quantizers"]["weight-dq"] == len(linears)
    with torch.no_grad():
        want = [m.qweight().numpy() for m in convs]
    n_weights = 0
    for part in ("encoder", "decoder"):
        graph = onnx.load(fc / f"{part}.onnx").graph
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        inits = constants(graph)
        for n in (n for n in graph.node if n.op_type == "Conv"):
            assert made_by.get(n.input[1]) in (None, "Constant") and n.input[1] in inits  # a constant, no DQ
            got = inits[n.input[1]]
            n_weights += any(got.shape == w_.shape and np.abs(got - w_).max() <= 1e-6 * np.abs(w_).max() for w_ in want)
    assert n_weights == len(convs)
    feats_fc = open_graph(fc / "encoder.onnx", "ort", 2)({"image": x_np})[0]
    np.testing.assert_allclose(feats_fc, feats_ort, rtol=1e-5, atol=1e-5)
