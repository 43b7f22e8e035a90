"""AHCQ-SAM's LNQ softmax quantizer: the level set and its inverse against the formula written out in float64, the
straight-through gradient, the per-image search against a brute-force grid, and LNQ inside a quantized SAM (it takes
the softmax sites from AGQ, is searched, saved / loaded and exported)."""
import copy
import math

import numpy as np
import pytest
import torch
from conftest import calib_samples

from ptq4sam.lnq import LNQSearch, lnq_error
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import QConfigError, load_qconfig
from ptq4sam.quantization import MinMaxObserver
from ptq4sam.quantization.lnq import LNQFakeQuantize, lnq_max_code, lnq_reference

CPU = torch.device("cpu")


def _levels64(bit, alpha, s):
    """The LNQ levels written out: (exp(k / L * ln(1 + alpha s)) - 1) / alpha, k = 0..L, L = 2^b - 1."""
    L = 2 ** bit - 1
    d = math.log1p(alpha * s)
    return np.array([math.expm1(k / L * d) / alpha for k in range(L + 1)])


def _quantize64(x, bit, alpha, s):
    """Nearest code in the transformed domain t = ln(1 + alpha min(x, s)) / ln(1 + alpha s), in float64."""
    L = 2 ** bit - 1
    t = np.log1p(alpha * np.minimum(np.maximum(x, 0), s)) / math.log1p(alpha * s)
    return _levels64(bit, alpha, s)[np.clip(np.rint(t * L), 0, L).astype(int)]


@pytest.mark.parametrize("bit,alpha,s", [(2, math.e - 1, 1.0), (4, 50.0, 0.6), (3, 0.001, 0.3)])
def test_level_set_and_rounding_equal_the_formula_in_float64(bit, alpha, s):
    x = torch.linspace(0, 1, 20001, dtype=torch.float32)
    got = lnq_reference(x, torch.tensor(s), alpha, lnq_max_code(bit)).double().numpy()
    want = _quantize64(x.double().numpy(), bit, alpha, s)
    # the same level for every x except a float32 rounding tie at a code boundary
    same = np.isclose(got, want, rtol=1e-6, atol=1e-9)
    assert same.mean() > 0.999
    levels = np.unique(got)
    np.testing.assert_allclose(levels, _levels64(bit, alpha, s), rtol=1e-6, atol=1e-9)
    assert len(levels) == 2 ** bit  # b bits: 2^b values, the zero included (the authors' runtime has one more)
    assert got[0] == 0.0 and np.all(got[x.numpy() >= s] == pytest.approx(s, rel=1e-6))


def test_hand_values_at_two_bits():
    """alpha = e - 1, s = 1: D = 1, levels (e^(k/3) - 1) / (e - 1) = 0, 0.2302, 0.5254, 1."""
    a, s = math.e - 1, torch.tensor(1.0)
    x = torch.tensor([0.0, 0.05, 0.12, 0.3, 0.4, 0.7, 0.8, 1.0, 3.0])
    # t = ln(1 + a x): 0, .0822, .1866, .4085, .5213, .7736, .8467, 1, 1 -> round(3t): 0, 0, 1, 1, 2, 2, 3, 3, 3
    lv = [(math.exp(k / 3) - 1) / a for k in range(4)]
    want = torch.tensor([lv[0], lv[0], lv[1], lv[1], lv[2], lv[2], lv[3], lv[3], lv[3]])
    torch.testing.assert_close(lnq_reference(x, s, a, 3), want, rtol=1e-6, atol=1e-7)


def test_quantizing_a_level_returns_it_and_tiny_alpha_is_the_uniform_grid():
    s = torch.tensor(0.5)
    lv = torch.tensor(_levels64(4, 20.0, 0.5), dtype=torch.float32)
    torch.testing.assert_close(lnq_reference(lv, s, 20.0, 15), lv, rtol=1e-6, atol=1e-7)  # the inverse
    uni = lnq_reference(torch.linspace(0, 0.5, 16), s, 1e-6, 15)
    torch.testing.assert_close(uni, torch.arange(16) / 15 * 0.5, rtol=0, atol=1e-4)


def test_gradient_is_straight_through_below_s_and_zero_above():
    q = LNQFakeQuantize(MinMaxObserver(4), bit=4, alpha=10.0)
    q.set_qparams(torch.tensor([0.5]), torch.zeros(1))
    q.initialized, q.fake_quant_enabled = True, True
    x = torch.tensor([0.0, 0.1, 0.3, 0.49, 0.51, 0.9], requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(y.detach(), q(x.detach()))  # the training path's values are the evaluation path's
    assert q.learnable_params() == []  # alpha and s stay as searched


def test_search_combines_per_image_optima_and_is_near_the_brute_force_optimum():
    """Per alpha, the error is the sum over images of each image's error at its own optimum s; alpha = the argmin of
    those sums, s = the mean of that alpha's per-image optima. The bounded scalar search (the authors') is local: its
    optima are within 5 % of the best s on a fine grid (measured here: 0.6 - 3 % above)."""
    g = torch.Generator().manual_seed(0)
    imgs = []
    for _ in range(2):
        attn = torch.softmax(torch.randn(2, 4, 16, 32, generator=g) * 3, dim=-1)
        imgs.append((attn, torch.randn(2, 4, 32, 8, generator=g)))
    alphas = (0.001, 10.0, 200.0)
    search = LNQSearch(4, alphas, p=2.0)
    for a, v in imgs:
        search.add(a, v)
    res = search.result()
    for k, al in enumerate(alphas):
        want = sum(lnq_error(a, v, a @ v, al, search.scales[k][j], 15, 2.0) for j, (a, v) in enumerate(imgs))
        assert res["error_per_alpha"][al] == pytest.approx(want, rel=1e-9)
    best = int(np.argmin([res["error_per_alpha"][al] for al in alphas]))
    assert res["alpha"] == alphas[best] and res["scale"] == pytest.approx(np.mean(search.scales[best]), rel=1e-12)
    for j, (a, v) in enumerate(imgs):
        amax, ref = float(a.max()), a @ v
        for k, al in enumerate(alphas):
            brute = min(lnq_error(a, v, ref, al, s, 15, 2.0) for s in np.linspace(0.1 * amax, amax, 400))
            assert lnq_error(a, v, ref, al, search.scales[k][j], 15, 2.0) <= brute * 1.05


def test_lnq_takes_the_softmax_sites_is_searched_and_survives_save_load(tmp_path):
    """ahcqsam.LNQ on a quantized SAM (ViT-B, random weights, 64 px): every softmax quantizer is LNQ (also with AGQ
    on: LNQ claims the site first), each alpha from the grid, s a softmax value in (0, 1]; the compact checkpoint
    restores alpha and s (the same logits); the export lists each LNQ quantizer as emulated (the graph's values:
    test_exported_lnq_is_the_same_quantizer)."""
    from ptq4sam.checkpoint import load_quantized, save_quantized
    from ptq4sam.deploy.onnx_export import export_sam
    from ptq4sam.quant_sam import quant_attentions
    from ptq4sam.samples import CalibSample

    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:3]
    fresh = copy.deepcopy(sam)
    seg = BoxPromptSegmenter(sam)
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    sample = CalibSample(img, np.array([[5, 5, 40, 30], [10, 0, 60, 47]], np.float32))
    opts = ["recon.iters=0", "w_qconfig.observer=MinMaxObserver", "w_qconfig.symmetric=true", "ptq4sam.AGQ=true",
            "ptq4sam.BIG=false", "ahcqsam.LNQ=true", "ahcqsam.lnq_alphas=[0.1, 10.0, 100.0]"]
    q = load_qconfig("exp/demo/config66.yaml", opts)
    info = quantize_segmenter(seg, [sample], q, quant_encoder=True, device=CPU, log=lambda *a: None)
    quants = [a.attn_quant.quantizer for a in quant_attentions(sam)]
    assert len(quants) == 3 + 7 and all(isinstance(x, LNQFakeQuantize) for x in quants)
    assert {e["alpha"] for e in info.methods["lnq"]} <= {0.1, 10.0, 100.0} and len(info.methods["lnq"]) == 10
    assert all(0 < float(x.scale) <= 1 for x in quants)
    ref = seg(img, sample.boxes).low_res_logits
    save_quantized(sam, tmp_path / "q.pth", q.to_dict(), True)
    seg2 = BoxPromptSegmenter(fresh)
    from ptq4sam.quant_sam import build_context, quantize_sam

    quantize_sam(fresh, build_context(q), quant_encoder=True)
    load_quantized(fresh, tmp_path / "q.pth", CPU, q, True)
    assert [a.attn_quant.quantizer.lnq_alpha for a in quant_attentions(fresh)] == [x.lnq_alpha for x in quants]
    assert torch.equal(seg2(img, sample.boxes).low_res_logits, ref)
    man = export_sam(sam, tmp_path / "onnx", 64, q.to_dict(), True).manifest
    assert man["quantizers"]["emulated-lnq"] == 10


@pytest.mark.parametrize("alpha", [0.001, 10.0, 200.0])
def test_exported_lnq_is_the_same_quantizer(alpha, tmp_path):
    """A softmax map through LNQ in ONNX Runtime (graph as written): the same level for every value (the code's ln(1 +
    y) is written with the same exportable operations; the levels are one float64-computed table)."""
    import onnxruntime as ort

    from ptq4sam.deploy.onnx_export import export_mode

    q = LNQFakeQuantize(MinMaxObserver(4), bit=4, alpha=alpha)
    q.set_qparams(torch.tensor([0.7]), torch.zeros(1))
    q.initialized, q.fake_quant_enabled = True, True
    mod = torch.nn.Sequential(torch.nn.Softmax(dim=-1), q)
    x = torch.randn(2, 4, 16, 64) * 4
    with torch.no_grad():
        ref = mod(x)
        with export_mode(mod) as recs:
            torch.onnx.export(mod, (x,), str(tmp_path / "l.onnx"), dynamo=False, opset_version=17)
    assert [r.kind for r in recs] == ["emulated-lnq"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(tmp_path / "l.onnx"), so)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert len(np.unique(out)) <= 16 and np.mean(out == ref.numpy()) > 0.9999


def test_checkpoints_written_before_a_method_existed_compare_as_its_defaults():
    """A compact checkpoint's q_config from before the ahcqsam / saqsam sections existed lacks them: it loads into a
    model with those methods off (their defaults), and is refused for one with LNQ on."""
    from ptq4sam.checkpoint import qconfig_differences

    now = load_qconfig("exp/demo/config66.yaml").to_dict()
    old = {k: v for k, v in now.items() if k not in ("ahcqsam", "saqsam")}
    assert qconfig_differences(old, now) == []
    lnq = load_qconfig("exp/demo/config66.yaml", ["ahcqsam.LNQ=true"]).to_dict()
    assert qconfig_differences(old, lnq) == ["ahcqsam.LNQ: False -> True"]


def test_lnq_config_errors_name_the_key():
    with pytest.raises(QConfigError, match=r"ahcqsam.lnq_alphas.*positive"):
        load_qconfig("exp/demo/config66.yaml", ["ahcqsam.lnq_alphas=[0, 1]"])
    with pytest.raises(QConfigError, match=r"ahcqsam.lnq_images"):
        load_qconfig("exp/demo/config66.yaml", ["ahcqsam.lnq_images=-1"])
    # a method's quantizer is placed at its sites by its switch, never on every activation
    with pytest.raises(QConfigError, match=r"'a_qconfig.quantizer' 'LNQFakeQuantize' is placed at its sites"):
        load_qconfig("exp/demo/config66.yaml", ["a_qconfig.quantizer=LNQFakeQuantize"])


def test_lnq_on_calibration_images_of_lite_medsam_beats_uniform_softmax_error():
    """On LiteMedSAM's decoder (real weights, 1 calibration image): the searched LNQ's attn.v error at 4 bits is
    below the uniform 4-bit quantizer's at its own best clip (the reason LNQ exists)."""
    from ptq4sam.quant_sam import QuantDecoderAttention, quant_attentions
    from ptq4sam.samples import CalibSample, record

    sam = build_sam("lite_medsam")
    seg = BoxPromptSegmenter(sam)
    q = load_qconfig("exp/demo/config66.yaml", ["recon.iters=0", "a_qconfig.bit=4", "ptq4sam.BIG=false",
                                                "ptq4sam.AGQ=false"])
    from ptq4sam.quant_sam import build_context, quantize_sam

    quantize_sam(sam, build_context(q), quant_encoder=False)
    atts = [a for a in quant_attentions(sam.mask_decoder) if isinstance(a, QuantDecoderAttention)][:2]
    s = calib_samples(1)[0]
    recs = record(seg, [CalibSample(s.image, s.boxes[:4])], atts, ["attn", "v"])
    for a in atts:
        attn, v = recs[id(a)]["attn"][0], recs[id(a)]["v"][0]
        ref = attn @ v
        search = LNQSearch(4, (0.001, 1.0, 10.0, 100.0), p=2.0)
        search.add(attn, v)
        amax = float(attn.max())
        uniform = min(float(((torch.fake_quantize_per_tensor_affine(attn, c * amax / 15, 0, 0, 15) @ v - ref) ** 2)
                            .mean()) for c in np.linspace(0.05, 1, 60))
        assert search.result()["error"] < uniform
