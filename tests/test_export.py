"""QDQ ONNX export (ptq4sam.deploy.onnx_export) run by ONNX Runtime and OpenVINO against our fake-quant forward."""
import numpy as np
import onnx
import pytest
import torch
from conftest import calib_samples

from ptq4sam.cpuinfo import int8_pairs_saturate
from ptq4sam.deploy.onnx_export import DecoderGraph, export_sam, integer_weight
from ptq4sam.deploy.runtime import OnnxSegmenter, open_graph
from ptq4sam.errors import InputError
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import load_qconfig
from ptq4sam.quantization import agq_quantize
from ptq4sam.quantization.logq import agq_quantize_, agq_reference
from ptq4sam.quantization.state import disable_all, enable_quantization
from ptq4sam.samples import CalibSample

CPU = torch.device("cpu")


def _quantized_lite(opts):
    # AGQ with one candidate (tau 4, the calibrated scale): its log2 grid is what the export must carry, not the search
    q = load_qconfig("exp/demo/config66.yaml", ["recon.iters=0", "ptq4sam.BIG=false", "ptq4sam.agq_search=grid",
                                                "ptq4sam.agq_images=1", "ptq4sam.taus=[4]",
                                                "ptq4sam.scale_ratios=[1.0]"] + opts)
    s = calib_samples(1)[0]
    sample = CalibSample(s.image, s.boxes[:4])
    sam = build_sam("lite_medsam")
    seg = BoxPromptSegmenter(sam)
    quantize_segmenter(seg, [sample], q, quant_encoder=True, device=CPU, log=lambda *a: None)
    return seg, sample, q


@pytest.fixture(scope="module")
def lite_w8a8(tmp_path_factory):
    """LiteMedSAM W8A8 (symmetric weights: the deploy setting), AGQ softmax, encoder + decoder, exported once; Linear
    weights as uint8 on a CPU without int8 dot products (as the deploy benchmark does: export_sam's u8_linear_weights)."""
    # MinMax weight ranges: the export is what is tested (MSE's 8-bit range search would take most of the time)
    seg, sample, q = _quantized_lite(["w_qconfig.bit=8", "a_qconfig.bit=8", "w_qconfig.symmetric=true",
                                      "w_qconfig.observer=MinMaxObserver"])
    out = tmp_path_factory.mktemp("onnx_w8a8")
    res = export_sam(seg.sam, out, 256, q.to_dict(), True, u8_linear_weights=int8_pairs_saturate())
    return seg, sample, out, res.manifest


def _reference(seg, sample):
    with torch.no_grad():
        x = seg.prepare_image(sample.image)
        feats = seg.sam.image_encoder(x)
        boxes = seg.transform.apply_boxes_torch(torch.as_tensor(sample.boxes), sample.image.shape[:2])
        low, iou = seg.decode(feats, torch.as_tensor(sample.boxes), sample.image.shape[:2])
    return x.contiguous().numpy(), feats.numpy(), boxes.numpy(), low.numpy(), iou.numpy()


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_exported_w8a8_lite_medsam_matches_the_fake_quant_model(lite_w8a8, backend):
    """Same input: the backend's masks equal ours on >= 99 % of pixels (decoder alone, from our image embedding:
    >= 99.9 %, >= 99.8 % for OpenVINO on a CPU with VNNI), and the backend's encoder is as close to the float model as
    ours (the remaining differences are rounding ties that flip one way or the other and propagate, not a different
    quantization)."""
    seg, sample, out, man = lite_w8a8
    assert man["quantizers"] == {"activation-qdq": 150, "emulated-agq": 17, "weight-dq": 99}
    x, feats, boxes, low, iou = _reference(seg, sample)
    enc, dec = open_graph(out / "encoder.onnx", backend, 2), open_graph(out / "decoder.onnx", backend, 2)
    f2 = enc({"image": x})[0]
    m_dec, i_dec = dec({"image_embeddings": feats, "boxes": boxes})
    # OpenVINO on an AVX-512 VNNI CPU (its int8 kernels there, not the AVX2 ones): 0.9988-0.9994 measured, one or two
    # threads; ONNX Runtime and OpenVINO on AVX2: >= 0.9999. A different quantization would disagree on whole masks.
    assert ((m_dec > 0) == (low > 0)).mean() >= (0.998 if backend == "openvino" and not int8_pairs_saturate() else 0.999)
    assert np.abs(i_dec[:, 0] - iou).max() < 0.01
    m_full, _ = dec({"image_embeddings": f2, "boxes": boxes})
    agree = ((m_full > 0) == (low > 0)).mean()
    print(f"{backend}: encoder max |diff| {np.abs(f2 - feats).max():.4f}, masks agree {agree:.5f}")
    assert agree >= 0.99
    disable_all(seg.sam)
    with torch.no_grad():
        fp = seg.sam.image_encoder(torch.from_numpy(x)).numpy()
    enable_quantization(seg.sam)
    ours, theirs = np.abs(feats - fp).mean(), np.abs(f2 - fp).mean()
    assert theirs < 1.1 * ours, (ours, theirs)
    assert np.abs(f2 - feats).mean() < 0.75 * ours


def test_integer_kernels_in_onnx_runtime_and_openvino(lite_w8a8, tmp_path):
    """ONNX Runtime's optimised graph runs the quantized Linear layers and attention matmuls as integer kernels
    (MatMulIntegerToFloat / QLinearMatMul), OpenVINO runs the quantized convolutions and linears in u8."""
    from ptq4sam.deploy.runtime import _OrtGraph

    _, _, out, _ = lite_w8a8
    opt = tmp_path / "opt.onnx"
    # the 15 depthwise convolutions' per-channel inputs (2 MBConv, 3 patch merging, 10 TinyViT local convs) run as
    # per-channel elementwise operators (conv_forms.fold_depthwise_input_qdq): no per-channel QuantizeLinear left in
    # what ONNX Runtime runs
    assert _OrtGraph(out / "encoder.onnx", 2, optimized_path=opt).rewritten_depthwise_inputs == 15
    graph = onnx.load(opt).graph
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "QuantizeLinear" and sizes.get(n.input[1], 1) > 1]
    ops = [n.op_type for n in graph.node]
    integer = sum(ops.count(k) for k in ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QLinearConv",
                                         "ConvInteger"))
    # 40 quantized Linear layers + q @ k^T of the 10 attentions (attn @ v takes AGQ's float-emulated softmax)
    assert integer == 40 + 10
    assert "Gemm" not in ops  # no quantized Linear left as DequantizeLinear + float Gemm
    prec = open_graph(out / "encoder.onnx", "openvino", 2).runtime_precisions()
    assert prec.get("FullyConnected:u8", 0) == 40
    assert prec.get("Convolution:u8", 0) >= 27 and prec.get("Convolution:f32", 0) <= 2  # patch_embed stays float


def test_onnx_segmenter_reproduces_the_pipeline_interface(lite_w8a8):
    """OnnxSegmenter (what test_quant.py --backend uses) gives the same masks as its graphs on the same input and
    keeps the torch segmenter's output format."""
    seg, sample, out, _ = lite_w8a8
    ref = seg(sample.image, sample.boxes)
    got = OnnxSegmenter(seg, out, "openvino", 2)(sample.image, sample.boxes)
    assert got.masks.shape == ref.masks.shape and got.masks.dtype == torch.bool
    assert (got.masks == ref.masks).float().mean() >= 0.99
    with pytest.raises(InputError, match="no export.json"):
        OnnxSegmenter(seg, out / "missing", "ort")


def test_float_export_and_decoder_graph_equal_the_torch_model(tmp_path):
    """No quantizer: the exported graphs compute SAM's own forward (float rounding only); the decoder graph with its
    dynamic number of boxes equals BoxPromptSegmenter.decode. ViT-B's first 3 blocks (2 windowed, 1 global): every
    kind of node the 12 blocks have, a quarter of the graph for the peers' quantizers to walk."""
    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:3]
    assert [b.window_size > 0 for b in sam.image_encoder.blocks] == [True, True, False]
    seg = BoxPromptSegmenter(sam)
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    boxes = torch.tensor([[5, 5, 40, 30], [10, 0, 60, 47], [0, 0, 63, 47]], dtype=torch.float32)
    with torch.no_grad():
        feats, _, osz = seg.encode(img)
        low, iou = seg.decode(feats, boxes, osz)
        tb = seg.transform.apply_boxes_torch(boxes, osz)
        low2, iou2 = DecoderGraph(sam)(feats, tb)
    assert torch.allclose(low2, low, atol=1e-4) and torch.allclose(iou2[:, 0], iou, atol=1e-5)
    export_sam(sam, tmp_path, 64)
    x = seg.prepare_image(img).contiguous().numpy()
    f2 = open_graph(tmp_path / "encoder.onnx", "ort")({"image": x})[0]
    np.testing.assert_allclose(f2, feats.numpy(), atol=1e-4)
    m2, _ = open_graph(tmp_path / "decoder.onnx", "ort")({"image_embeddings": feats.numpy(), "boxes": tb[:1].numpy()})
    np.testing.assert_allclose(m2, low[:1].numpy(), atol=1e-3)  # another number of boxes than at export
    # the peers quantize this float export; their folders run like ours
    from ptq4sam.deploy import peers

    calib = {"encoder": [{"image": x}], "decoder": [{"image_embeddings": feats.numpy(), "boxes": tb.numpy()}]}
    for make, backend in ((lambda d: peers.ort_quantize_static(tmp_path, d, calib), "ort"),
                          (lambda d: peers.nncf_quantize(tmp_path, d, calib), "openvino")):
        d = tmp_path / backend
        man = make(d)
        assert man["quantized"] and set(man["files"]) == {"encoder", "decoder"}
        if backend == "ort":  # the graphs really are quantized: QDQ pairs on the encoder's MatMuls / Convs
            import onnx

            ops = [n.op_type for n in onnx.load(str(d / man["files"]["encoder"])).graph.node]
            assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
        else:
            xml = (d / man["files"]["encoder"]).read_text()
            assert xml.count('type="FakeQuantize"') >= 10
        got = OnnxSegmenter(seg, d, backend)(img, boxes.numpy())
        assert got.masks.shape == (3, 48, 64)
        # W8A8 of a float graph: the logits stay close to the float model's (and are not the float model's)
        lo = torch.as_tensor(got.low_res_logits)
        err = float((lo - low).norm() / low.norm())
        assert 0 < err < 0.2, (backend, err)


def test_vit_b_w4a4_export_matches_fake_quant(tmp_path):
    """SAM ViT-B (random weights, 64 px, its first 3 blocks: windowed, windowed, global), W4A4 with AGQ: below 8 bits
    the QDQ pairs carry a Clip to the b-bit grid."""
    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:3]
    seg = BoxPromptSegmenter(sam)
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    sample = CalibSample(img, np.array([[5, 5, 40, 30], [10, 0, 60, 47]], np.float32))
    q = load_qconfig("exp/demo/config44.yaml", ["recon.iters=0", "w_qconfig.observer=MinMaxObserver",
                                                "ptq4sam.agq_search=grid", "ptq4sam.agq_images=1"])
    quantize_segmenter(seg, [sample], q, quant_encoder=True, device=CPU, log=lambda *a: None)
    man = export_sam(sam, tmp_path, 64, q.to_dict(), True).manifest
    assert man["quantizers"]["emulated-agq"] == 3 + 7  # 3 ViT blocks + 7 decoder attentions
    assert all(r["dtype"] == "int8" for r in man["quantizer_list"] if r["kind"] == "weight-dq")  # W4 as int8
    enc = onnx.load(tmp_path / "encoder.onnx")
    assert sum(n.op_type == "Clip" for n in enc.graph.node) > 0
    x, feats, boxes, low, _ = _reference(seg, sample)
    m_dec, _ = open_graph(tmp_path / "decoder.onnx", "ort")({"image_embeddings": feats, "boxes": boxes})
    assert ((m_dec > 0) == (low > 0)).mean() >= 0.99
    f2 = open_graph(tmp_path / "encoder.onnx", "ort")({"image": x})[0]
    assert np.corrcoef(f2.ravel(), feats.ravel())[0, 1] > 0.99
    # INT4 storage: every weight packed two per byte (asymmetric 4-bit grids: UINT4 with per-channel zero points),
    # the same dequantized weights, so ONNX Runtime computes the same outputs as from the int8-stored graph
    i4 = export_sam(sam, tmp_path / "int4", 64, q.to_dict(), True, int4_weights=True).manifest
    n_weights = sum(r["kind"] == "weight-dq" for r in man["quantizer_list"])
    packed = i4["int4_weights"]
    assert i4["opset"] == 21 and packed["encoder"]["packed"] + packed["decoder"]["packed"] == n_weights
    assert all(p["kept"] == 0 and p["weight_bytes_int4"] * 2 >= p["weight_bytes_int8"] > 0 for p in packed.values())
    for part in ("encoder", "decoder"):
        saved = man["file_bytes"][part] - i4["file_bytes"][part]
        assert saved >= 0.95 * (packed[part]["weight_bytes_int8"] - packed[part]["weight_bytes_int4"]), part
        g4 = onnx.load(tmp_path / "int4" / f"{part}.onnx")
        assert {t.data_type for t in g4.graph.initializer} & {onnx.TensorProto.UINT4, onnx.TensorProto.INT4}
        assert not any(t.data_type == onnx.TensorProto.INT8 for t in g4.graph.initializer)
    np.testing.assert_array_equal(open_graph(tmp_path / "int4" / "encoder.onnx", "ort")({"image": x})[0], f2)
    d4, _ = open_graph(tmp_path / "int4" / "decoder.onnx", "ort")({"image_embeddings": feats, "boxes": boxes})
    np.testing.assert_allclose(d4, m_dec, rtol=0, atol=1e-5 * np.abs(m_dec).max())


def test_integer_weight_and_agq_forms_are_exact():
    """The stored integers dequantize to exactly our quantized weight (symmetric form when q - z fits int8, else
    uint8 with zero points); the exportable AGQ equals ours on values away from rounding ties."""
    from ptq4sam.quantization import QuantizerConfig, QuantLinear

    torch.manual_seed(0)
    for bit, sym in ((4, False), (8, False), (8, True)):
        lin = QuantLinear.from_float(torch.nn.Linear(16, 8), QuantizerConfig(
            quantizer="FixedFakeQuantize", observer="MinMaxObserver", bit=bit, symmetric=sym, ch_axis=0), None)
        lin.calibrate_weight()
        lin.weight_quantizer.fake_quant_enabled = True
        q, s, z, axis = integer_weight(lin)
        assert axis == 0 and q.dtype == (torch.uint8 if (bit, sym) == (8, False) else torch.int8)
        assert torch.equal((q.float() - z.float()[:, None]) * s[:, None], lin.qweight())
        # unsigned storage (u8_linear_weights): uint8 with zero point 128 where int8 would be used, the same values
        qu, su, zu, _ = integer_weight(lin, unsigned=True)
        assert qu.dtype == torch.uint8 and (q.dtype == torch.uint8 or bool((zu == 128).all()))
        assert torch.equal((qu.float() - zu.float()[:, None]) * su[:, None], lin.qweight())
    x = torch.rand(1000) ** 4
    s = torch.tensor(0.9)
    # the export's AGQ and the quantizer's (training and evaluation) are one formula: the same bits
    assert torch.equal(agq_reference(x, s, 2, 16), agq_quantize(x, s, 2, 16))
    assert torch.equal(agq_reference(x, s, 2, 16), agq_quantize_(x.clone(), s, 2, 16))


def test_export_refuses_a_model_not_in_evaluation_state(tmp_path):
    seg, _, _ = _quantized_lite_small()
    from ptq4sam.quantization import set_drop_prob

    set_drop_prob(seg.sam, 0.5)
    with pytest.raises(InputError, match="not in the evaluation state"):
        export_sam(seg.sam, tmp_path, 64, {}, True, parts=("decoder",))


def _quantized_lite_small():
    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    seg = BoxPromptSegmenter(sam)
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    sample = CalibSample(img, np.array([[5, 5, 40, 30]], np.float32))
    q = load_qconfig("exp/demo/config66.yaml", ["recon.iters=0", "ptq4sam.AGQ=false", "w_qconfig.observer=MinMaxObserver"])
    quantize_segmenter(seg, [sample], q, quant_encoder=False, device=CPU, log=lambda *a: None)
    return seg, sample, q


def test_benchmark_deploy_takes_accuracy_from_an_earlier_run(tmp_path):
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("benchmark_deploy", ROOT / "tools" / "benchmark_deploy.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    old = {"rows": [{"model": "FP32", "backend": "ort", "encoder_ms": 9.0, "segm_mAP": 0.2653, "segm_mAP_50": 0.5,
                     "num_images": 96, "predictions": "p.json"},
                    {"model": "X", "backend": "ort", "error": "fails"}]}
    f = tmp_path / "deploy.json"
    f.write_text(json.dumps(old))
    rows = [{"model": "FP32", "backend": "ort", "encoder_ms": 5.0}, {"model": "X", "backend": "ort", "error": "again"}]
    bd.copy_accuracy(rows, [str(f)])
    assert rows[0] == {"model": "FP32", "backend": "ort", "encoder_ms": 5.0, "segm_mAP": 0.2653, "segm_mAP_50": 0.5,
                       "num_images": 96, "predictions": "p.json"}  # the new timing kept, the old mAP taken
    with pytest.raises(InputError, match="no mask mAP for 'FP32' on openvino"):
        bd.copy_accuracy([{"model": "FP32", "backend": "openvino", "encoder_ms": 1.0}], [str(f)])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a deploy.json"):
        bd.copy_accuracy(rows, [str(tmp_path / "bad.json")])
    # several earlier runs: each row from the one that has it; one row with two different numbers is refused
    f2 = tmp_path / "deploy2.json"
    f2.write_text(json.dumps({"rows": [{"model": "Y", "backend": "openvino", "segm_mAP": 0.25},
                                       {"model": "FP32", "backend": "ort", "segm_mAP": 0.2653}]}))
    two = [{"model": "FP32", "backend": "ort"}, {"model": "Y", "backend": "openvino"}]
    bd.copy_accuracy(two, [str(f), str(f2)])
    assert [r["segm_mAP"] for r in two] == [0.2653, 0.25]
    f2.write_text(json.dumps({"rows": [{"model": "FP32", "backend": "ort", "segm_mAP": 0.26}]}))
    with pytest.raises(InputError, match=r"'FP32' on ort has mask mAP 0.2653 in .*deploy.json and 0.26 in"):
        bd.copy_accuracy(two[:1], [str(f), str(f2)])
    with pytest.raises(SystemExit):  # --accuracy-from without --no-accuracy: refused before any work
        bd.main(["--accuracy-from", str(f), "--out-dir", str(tmp_path / "o")])
    # --reuse-models keeps a graph only if it was exported from the checkpoint named now
    m = tmp_path / "models"
    for sub, info in (("fp32", {}), ("ours_X", {"checkpoint": "a.pth"})):
        (m / sub).mkdir(parents=True)
        (m / sub / "export.json").write_text(json.dumps({"format": "ptq4sam-onnx-1", "info": info, "files": {}}))
    with pytest.raises(InputError, match="exported from 'a.pth', not from 'b.pth'"):
        bd.main(["--ours", "X=b.pth", "--reuse-models", "--models-dir", str(m), "--peers", "--no-accuracy",
                 "--out-dir", str(tmp_path / "o")])
    # ... and with the Linear-weight storage asked for now (that graph was made with int8 weights)
    with pytest.raises(InputError, match="exported with u8_linear_weights=False, this run asks for True"):
        bd.main(["--ours", "X=a.pth", "--reuse-models", "--models-dir", str(m), "--peers", "--no-accuracy",
                 "--u8-linear-weights", "on", "--out-dir", str(tmp_path / "o")])
    # a model with float Linear inputs gets float-stored Linear weights by default (and never uint8 ones), one with
    # float convolution inputs float-stored convolution weights
    for kind, u8 in (("linear", "on"), ("conv", "off")):
        (m / "ours_X" / "export.json").write_text(json.dumps({"format": "ptq4sam-onnx-1", "files": {},
                                                              "info": {"checkpoint": "a.pth"},
                                                              "q_config": {"inputs": {kind: "float"}}}))
        with pytest.raises(InputError, match=rf"exported with float_{kind}_weights=False, this run asks for True "
                                             rf"\(--float-{kind}-weights auto;"):
            bd.main(["--ours", "X=a.pth", "--reuse-models", "--models-dir", str(m), "--peers", "--no-accuracy",
                     "--u8-linear-weights", u8, "--out-dir", str(tmp_path / "o")])


def test_benchmark_deploy_times_every_model_once_per_round(monkeypatch, tmp_path):
    """A slow spell of the machine must touch every model alike: each backend's models are timed in rounds (encoder a,
    decoders a, encoder b, ...) after every call's warm-up, one backend after the other; each row gets the median of
    its own calls (a late-bound graph or box count would give one row another's times); a graph that does not compile
    is a row with its error."""
    import importlib.util
    import json
    import weakref

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("benchmark_deploy", ROOT / "tools" / "benchmark_deploy.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    clock, calls = [0.0], []
    # seconds of each timed call, by (model, backend, part), round by round: medians 2, 5, 7, ...
    cost = {("A", "ort", "encoder"): [1, 9, 2], ("A", "ort", "decoder1"): [5, 5, 5], ("A", "ort", "decoder3"): [8, 6, 7],
            ("B", "ort", "encoder"): [3, 1, 2], ("B", "ort", "decoder1"): [4, 4, 9], ("B", "ort", "decoder3"): [1, 1, 1],
            ("A", "openvino", "encoder"): [6, 6, 6], ("A", "openvino", "decoder1"): [2, 3, 4],
            ("A", "openvino", "decoder3"): [7, 7, 9]}

    alive, open_at_ov = weakref.WeakSet(), []  # graphs not yet closed; their backends when an openvino one opens

    class Graph:
        def __init__(self, path, backend, threads):
            self.model, self.part, self.backend = path.parent.name, path.stem, backend
            if backend == "openvino":
                open_at_ov.extend(g.backend for g in alive)
            alive.add(self)
            if self.model == "B" and backend == "openvino":
                raise RuntimeError("cannot compile\n  B")

        def __call__(self, feeds):
            key = (self.model, self.backend, self.part if self.part == "encoder" else f"decoder{len(feeds['boxes'])}")
            calls.append(key)
            i = calls.count(key) - 2  # the first call of each is the warm-up (after the encoder's feature call)
            if self.part == "encoder":
                i -= 1
            clock[0] += cost[key][i] if i >= 0 else 100.0
            return [np.zeros(1)]

        def runtime_precisions(self):
            return {"Convolution:u8": 1, "Reorder:f32": 2}

    for m in "AB":
        (tmp_path / m).mkdir()
        for f in ("encoder.onnx", "decoder.onnx"):
            (tmp_path / m / f).write_bytes(b"x")
        (tmp_path / m / "export.json").write_text(json.dumps({
            "format": "ptq4sam-onnx-1", "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx"},
            "file_bytes": {"encoder": 3, "decoder": 4}}))
    monkeypatch.setattr(bd.time, "perf_counter", lambda: clock[0])
    models = [("A", tmp_path / "A", ("ort", "openvino")), ("B", tmp_path / "B", ("ort", "openvino"))]
    boxes = {1: np.zeros((1, 4)), 3: np.zeros((3, 4))}
    rows = bd.time_models(models, np.zeros(1), boxes, 2, 1, 3, open_fn=Graph)
    assert [(r["model"], r["backend"]) for r in rows] == [("A", "ort"), ("A", "openvino"), ("B", "ort"),
                                                          ("B", "openvino")]
    assert open_at_ov and "ort" not in open_at_ov  # one backend's graphs open at a time (memory)
    assert rows[3]["error"] == "cannot compile B" and "encoder_ms" not in rows[3]
    for r in rows[:3]:
        for key, part in (("encoder_ms", "encoder"), ("decoder_ms_1", "decoder1"), ("decoder_ms_3", "decoder3")):
            assert r[key] == 1000.0 * sorted(cost[(r["model"], r["backend"], part)])[1], (r, key)
    assert rows[1]["ov_precisions"] == {"Convolution:u8": 1} and "ov_precisions" not in rows[0]
    seen, timed = {}, []  # the calls after each graph's feature call (encoder) and warm-up call
    for c in calls:
        seen[c] = seen.get(c, 0) + 1
        if seen[c] > (2 if c[2] == "encoder" else 1):
            timed.append(c)
    ort = [(m, p) for m, b, p in timed if b == "ort"]
    parts = ["encoder", "decoder1", "decoder3"]
    assert ort == [(m, p) for _ in range(3) for m in "AB" for p in parts]  # rounds over the ort models
    assert [b for _, b, _ in timed] == ["ort"] * 18 + ["openvino"] * 9  # one backend after the other


def test_ov_profile_names_the_kernels_that_ran(tmp_path):
    """ptq4sam.deploy.ov_profile: rows by (layer type, kernel), integer kernels told from their names, and on a real
    compiled Linear layer the counters' rows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ptq4sam.deploy.ov_profile import integer_kernel, integer_share, profile, summarize

    assert integer_kernel("FullyConnected", "jit_gemm_I8") and integer_kernel("GroupConvolution", "jit_avx2_I8")
    assert integer_kernel("Convolution", "brgconv_avx512_1x1_u8")
    assert not integer_kernel("FullyConnectedCompressed", "brgemm_avx2_f32")  # u8 weights, float arithmetic
    assert not integer_kernel("Convert", "ref_I8") and not integer_kernel("Transpose", "unknown_i8")  # moves only
    rows = summarize([{"layer_type": "FullyConnected", "exec_type": "jit_gemm_I8", "ms": 2.0},
                      {"layer_type": "FullyConnected", "exec_type": "jit_gemm_I8", "ms": 1.5},
                      {"layer_type": "FullyConnected", "exec_type": "gemm_mlas_f32", "ms": 4.0},
                      {"layer_type": "Constant", "exec_type": "undef", "ms": 0.0}])
    assert rows == [{"layer_type": "FullyConnected", "exec_type": "gemm_mlas_f32", "nodes": 1, "ms": 4.0,
                     "integer": False},
                    {"layer_type": "FullyConnected", "exec_type": "jit_gemm_I8", "nodes": 2, "ms": 3.5,
                     "integer": True}]
    assert integer_share(rows) == {"integer": 2, "float": 1}
    assert integer_share(rows, ("Convolution",)) == {"integer": 0, "float": 0}
    # a Linear layer whose weight is stored as uint8 (zero point 128, as our exports on CPUs without VNNI) and whose
    # activation is float: OpenVINO keeps the weight compressed and multiplies in float, whatever the CPU; its
    # runtime precision still reads u8, its kernel does not
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (64, 32)).astype(np.uint8), "wq"),
             numpy_helper.from_array(np.full(32, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.full(32, 128, np.uint8), "wz")]
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
                           helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    res = profile(path, {"x": rng.standard_normal((8, 64)).astype(np.float32)}, threads=1, runs=2, warmup=1)
    fc = [r for r in res["rows"] if r["layer_type"].startswith("FullyConnected")]
    assert fc and not any(r["integer"] for r in fc), res["rows"]
    assert res["wall_ms"] > 0 and all(r["ms"] >= 0 for r in res["rows"])


def test_backend_threads_follow_omp_num_threads_unless_given(monkeypatch):
    from ptq4sam.deploy.runtime import runtime_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime_threads(0) == 1 and runtime_threads(3) == 3
    for env in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", env)
        assert runtime_threads(0) == 0
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime_threads(0) == 0 and runtime_threads(2) == 2


def test_int4_packing_by_hand(tmp_path):
    """pack_int4_weights on a written-out graph: a symmetric weight (q in [-8, 7]) -> INT4, an asymmetric one (16
    levels per channel) -> UINT4 with per-channel zero points, a 17-level one kept as int8, an activation's QDQ
    untouched; the nibbles in ONNX's order; ONNX Runtime's outputs unchanged."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ptq4sam.deploy.int4 import pack_int4_weights, pack_nibbles

    assert pack_nibbles(np.array([1, -2, 15])) == bytes([0xE1, 0x0F])  # low nibble first, odd count padded
    rng = np.random.default_rng(0)
    sym = rng.integers(-8, 8, (6, 4))
    asym = rng.integers(-9, 7, (6, 4))
    asym[0, :] = -9
    asym[1, :] = 6  # 16 levels (-9 ... 6) in every column but the last
    asym[:, 3] = rng.integers(3, 13, 6)  # all positive (3 ... 12): zero point 0, not a negative one
    wide = rng.integers(-9, 8, (6, 4))
    wide[0, 0], wide[1, 0] = -9, 8  # 18 levels in column 0
    inits, nodes = [], []
    for name, q in (("sym", sym), ("asym", asym), ("wide", wide)):
        inits += [numpy_helper.from_array(q.astype(np.int8), name), numpy_helper.from_array(
            (rng.random(4) + 0.5).astype(np.float32), name + "_s"), numpy_helper.from_array(np.zeros(4, np.int8), name + "_z")]
        nodes.append(helper.make_node("DequantizeLinear", [name, name + "_s", name + "_z"], [name + "_w"], axis=1))
    inits += [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xz")]
    nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    nodes += [helper.make_node("MatMul", ["xd", f"{n}_w"], [f"y_{n}"]) for n in ("sym", "asym", "wide")]
    outs = [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, [2, 4]) for n in ("sym", "asym", "wide")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])], outs, inits)
    path = tmp_path / "g.onnx"
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # what ONNX Runtime reads
    onnx.save(model, str(path))
    x = rng.random((2, 6)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})
    got = pack_int4_weights(path)
    assert got == {"packed": 2, "kept": 1, "weight_bytes_int8": 48, "weight_bytes_int4": 24}
    m = onnx.load(str(path))
    t = {i.name: i for i in m.graph.initializer}
    assert t["sym_4bit"].data_type == TensorProto.INT4 and np.array_equal(numpy_helper.to_array(t["sym_4bit"]), sym)
    assert t["asym_4bit"].data_type == TensorProto.UINT4
    np.testing.assert_array_equal(numpy_helper.to_array(t["asym_4bit_zero_point"]), [9, 9, 9, 0])
    np.testing.assert_array_equal(numpy_helper.to_array(t["asym_4bit"]), asym + [9, 9, 9, 0])
    assert t["wide"].data_type == TensorProto.INT8 and "sym" not in t and "xz" in t
    after = ort.InferenceSession(str(path)).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_openvino_fuses_a_log_free_softmax_quantizer_but_not_agq():
    """(x86-64 with AVX2: the CPU plugin's attention fusion; f32) OpenVINO fuses an attention (one Subgraph, no
    MatMul / Softmax left) with a float, uniform-QDQ or power-law (Pow, QDQ, Pow) softmax, and not with AGQ's exported
    form or AGQ's Log in a single chain."""
    from ptq4sam.cpuinfo import cpu_info
    from ptq4sam.deploy.fusion import probe

    if "AVX2" not in cpu_info()["isa"]:
        pytest.skip("OpenVINO's CPU attention fusion is checked on x86-64 with AVX2")
    rows = {r["form"]: r for r in probe(["float (attention.placement: float)", "softmax uniform QDQ",
                                         "softmax power-law (Pow, QDQ, Pow)",
                                         "softmax AGQ (exported form)", "softmax AGQ, one chain (Log, no zero branch)"])}
    assert [r["fused"] for r in rows.values()] == [True, True, True, False, False], rows
    assert rows["softmax AGQ (exported form)"]["ops"].get("MatMul:f32") == 2
