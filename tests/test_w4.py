"""HLUQ, CAG, exact smoothing, log-space scale learning, per-module bit overrides (references from the
formulas; exact equalities where the maths says so)."""
import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import calib_samples

from ptq4sam.checkpoint import load_quantized, save_quantized
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import QConfigError, ReconSection, load_qconfig
from ptq4sam.quant_sam import build_context, quantize_sam
from ptq4sam.quantization import (
    OBSERVERS,
    AvgMinMaxObserver,
    CAGFakeQuantize,
    HLUQFakeQuantize,
    HybridRangeObserver,
    QuantConv2d,
    QuantizerConfig,
    QuantLinear,
    freeze,
    group_channels,
    hluq_level_set,
    hluq_levels,
    hluq_quantize,
    qparams_from_range,
    unfreeze,
)
from ptq4sam.reconstruction import UnitCache, reconstruct_unit
from ptq4sam.smooth import smooth_sam

ROOT_EXP = "exp/demo/config44.yaml"


@pytest.fixture(scope="module")
def lite():
    return build_sam("lite_medsam")


# ---- HLUQ ---------------------------------------------------------------------------------------------------------
def test_hluq_level_set_and_hand_values():
    # 3 bits, grid_rate 1/2: 4 log levels + the zero below the split, 4 uniform levels from the split up
    assert hluq_levels(3, 0.5) == (4, 4) and hluq_levels(4, 0.125) == (2, 14)
    with pytest.raises(ValueError, match="grid_rate"):
        hluq_levels(2, 0.125)  # 0.5 log levels
    m, s_log, s_uni = -0.5, 1.0, 0.5
    levels = hluq_level_set(m, s_log, s_uni, 4, 4)
    assert levels == [m + v for v in (0.0, 0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5)]  # 2^3 distinct values
    x = torch.tensor([0.01, 0.3, 0.7, 1.0, 1.7, 2.3, 10.0, -3.0]) + m  # offsets from the minimum
    want = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, 2.5, 2.5, 0.0]) + m
    # 0.01: n = round(6.64) = 7 >= 4 -> 0; 0.3: n = round(1.74) = 2 -> 0.25; 0.7: n = 1 -> 0.5; 1.7: u = round(1.4) = 1
    # 10 saturates at the top uniform level (AHCPTQ's code would give s_log there); below the minimum -> 0
    assert torch.allclose(hluq_quantize(x, m, s_log, s_uni, 4, 4), want)
    out = hluq_quantize(torch.linspace(-1, 5, 999) + m, m, s_log, s_uni, 4, 4)
    assert set(np.round(out.numpy(), 6)) <= set(np.round(np.array(levels), 6))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_hluq_observer_picks_the_candidate_of_least_output_error(kind):
    torch.manual_seed(0)
    if kind == "linear":
        x = F.gelu(torch.randn(3, 50, 16) * 2)  # skewed, heavy right tail
        layer = torch.nn.Linear(16, 8)
        args = (layer.weight, layer.bias)
    else:  # a convolution scores the candidates by its own output (ahcptq.convs)
        x = F.gelu(torch.randn(3, 1, 16, 6, 6) * 2)
        layer = torch.nn.Conv2d(16, 8, 3, padding=1)
        args = (layer.weight, layer.bias, layer._conv_forward)
    obs = HybridRangeObserver(bit=4, top_rates=(1.0, 0.5))
    for b in x:
        obs.set_layer(*args)
        obs(b)
    # reference: the paper's per-batch scoring, written out (running average range at each batch)
    ref = {}
    lo_run = hi_run = None
    for i, b in enumerate(x):
        lo, hi = b.min(), b.max()
        lo_run = lo if i == 0 else (lo_run * i + lo) / (i + 1)
        hi_run = hi if i == 0 else (hi_run * i + hi) / (i + 1)
        for rr, gr, tr in itertools.product((0.1, 0.3, 0.5), (0.125, 0.25, 0.5), (1.0, 0.5)):
            r = (hi_run - lo_run) * tr  # top_rate 0.5: the range's top half clipped (ours; AHCPTQ: 1 only)
            l_log = int(16 * gr)
            xq = hluq_quantize(b, lo_run, r * rr, r * (1 - rr) / (15 * (1 - gr)), l_log, 16 - l_log)
            ref[(rr, gr, tr)] = ref.get((rr, gr, tr), 0) + float((layer(xq) - layer(b)).pow(2).mean().detach())
    assert obs.best() == min(ref, key=ref.get)
    assert torch.allclose(obs.loss_sum, torch.tensor([ref[c] for c in obs.candidates]), rtol=1e-4)
    q = HLUQFakeQuantize(obs, bit=4)
    q.init_from_observer()
    q.fake_quant_enabled = True
    assert q.grid_rate == obs.best()[1] and float(q.fp_min) == pytest.approx(float(lo_run))


# ---- CAG ----------------------------------------------------------------------------------------------------------
def _cag(groups, x, bit=4, axis=-1):
    q = CAGFakeQuantize(AvgMinMaxObserver(bit, False, -1), bit=bit, groups=groups, ch_axis=axis)
    q.observer_enabled = True
    q(x)
    q.observer_enabled = False
    q.init_from_observer()
    q.fake_quant_enabled = True
    return q


@pytest.mark.parametrize("axis", [-1, 1])  # a Linear's input (channels last) / a convolution's (NCHW)
def test_cag_grouping_extremes_equal_per_channel_and_per_tensor(axis):
    torch.manual_seed(0)
    ranges = torch.logspace(-1, 1, 12)  # channels of very different ranges
    x = torch.randn(2, 30, 12) * ranges if axis == -1 else torch.randn(2, 12, 5, 6) * ranges.reshape(1, 12, 1, 1)
    ax = axis % x.dim()
    with torch.no_grad():
        per_ch = _cag(12, x, axis=axis)(x)
        flat = x.movedim(ax, -1).reshape(-1, 12)
        s, z = qparams_from_range(flat.amin(0), flat.amax(0), 4, False)
        assert torch.equal(per_ch, torch.fake_quantize_per_channel_affine(x, s, z.int(), ax, 0, 15))
        per_t = _cag(1, x, axis=axis)(x)
        s, z = qparams_from_range(x.min().reshape(1), x.max().reshape(1), 4, False)
        assert torch.equal(per_t, torch.fake_quantize_per_tensor_affine(x, s, z.int(), 0, 15))
        err = [float((_cag(g, x, axis=axis)(x) - x).pow(2).mean()) for g in (1, 2, 4, 12)]
    assert err[0] > err[1] > err[2] > err[3]  # more groups, less error


def test_ahcptq_convs_put_hluq_and_cag_on_dense_conv_inputs(lite):
    def input_quantizers(opts):
        sam = copy.deepcopy(lite)
        quantize_sam(sam, build_context(load_qconfig(ROOT_EXP, opts)), True)
        return {n[: -len(".input_quant")]: m.quantizer for n, m in sam.named_modules() if n.endswith("input_quant")}

    on = input_quantizers(["ahcptq.HLUQ=true", "ahcptq.CAG=true", "ahcptq.convs=true"])
    off = input_quantizers(["ahcptq.HLUQ=true", "ahcptq.CAG=true"])
    b0 = "image_encoder.layers.0.blocks.0"
    assert isinstance(on[f"{b0}.conv3"], HLUQFakeQuantize)  # after GELU (act2)
    assert isinstance(on["image_encoder.layers.2.downsample.conv3"], HLUQFakeQuantize)
    assert isinstance(on[f"{b0}.conv1"], CAGFakeQuantize) and on[f"{b0}.conv1"].ch_axis == 1
    assert isinstance(on["image_encoder.neck.0"], CAGFakeQuantize)
    dw = on[f"{b0}.conv2"]  # post-GELU depthwise: one HLUQ grid per channel
    assert isinstance(dw, HLUQFakeQuantize) and dw.ch_axis == 1 and dw.observer.groups == 256
    assert type(on["image_encoder.layers.1.blocks.0.local_conv"]).__name__ == type(off[f"{b0}.conv2"]).__name__ \
        == "LSQFakeQuantize"  # depthwise, not after a GELU / HLUQ off: per-channel LSQ
    convs = [n for n in off if n.startswith("image_encoder") and ("conv" in n or "neck" in n)]
    assert convs and all(type(off[n]).__name__ == "LSQFakeQuantize" for n in convs)  # AHCPTQ itself: linears only
    assert all(type(on[n]) is type(off[n]) for n in on if n not in convs)  # linears: the same either way


def test_groupwise_hluq_is_per_tensor_hluq_on_each_group():
    torch.manual_seed(0)
    ranges = torch.tensor([0.2, 0.2, 1.0, 8.0])
    x = F.gelu(torch.randn(2, 4, 6, 6) * ranges.reshape(1, 4, 1, 1))  # NCHW, one outlier channel
    conv = torch.nn.Conv2d(4, 3, 1)
    q = HLUQFakeQuantize(HybridRangeObserver(bit=4, ch_axis=1, groups=4, top_rates=(1.0, 0.5)), bit=4, ch_axis=1)
    q.observer.set_layer(conv.weight, conv.bias, conv._conv_forward)
    q.observer(x)
    q.init_from_observer()
    q.fake_quant_enabled = True
    rr, gr, tr = q.observer.best()
    assert q.group.tolist() == [0, 1, 2, 3] and q.ch_axis == 1 and q.scale.numel() == 4
    with torch.no_grad():
        got = q(x)
    l_log = int(16 * gr)
    for c in range(4):  # each channel: the per-tensor grid of its own range, with the jointly chosen rates
        xc = x[:, c]
        lo, r = xc.min(), (xc.max() - xc.min()) * tr
        want = hluq_quantize(xc, lo, r * rr, r * (1 - rr) / (15 * (1 - gr)), l_log, 16 - l_log)
        assert torch.allclose(got[:, c], want, atol=1e-6)
    per_tensor = HLUQFakeQuantize(HybridRangeObserver(bit=4, top_rates=(1.0, 0.5)), bit=4)
    per_tensor.observer.set_layer(conv.weight, conv.bias, conv._conv_forward)
    per_tensor.observer(x)
    per_tensor.init_from_observer()
    per_tensor.fake_quant_enabled = True
    with torch.no_grad():
        assert (conv(got) - conv(x)).pow(2).mean() < (conv(per_tensor(x)) - conv(x)).pow(2).mean()


def _sparse_batches():
    """Two batches of 4 channels (a Linear's input, channels last): each channel is large in one batch only, as the
    decoder's token channels are; channels 0, 1 have ranges near 4, channels 2, 3 near 1."""
    a = torch.zeros(1, 3, 4)
    a[0, :, 0] = torch.tensor([0.0, 2.0, 4.0])
    a[0, :, 2] = torch.tensor([0.0, 0.5, 1.0])
    b = torch.zeros(1, 3, 4)
    b[0, :, 1] = torch.tensor([0.0, 3.0, 4.0])
    b[0, :, 3] = torch.tensor([0.0, 1.0, 1.0])
    return [a, b]


@pytest.mark.parametrize("mode, top", [("channel", 2.0), ("batch", 4.0)])
def test_cag_group_range_hand_case(mode, top):
    # per-channel maxima averaged over the two batches: (2, 2, 0.5, 0.5); grouped by them into {0, 1} and {2, 3}.
    # "channel": a group's top = the largest averaged channel maximum = 2 (channel 0 holds 4: clipped);
    # "batch": per batch the group's top (4, then 4), averaged = 4.
    xs = _sparse_batches()
    q = CAGFakeQuantize(AvgMinMaxObserver(4, False, -1), bit=4, groups=2, group_range=mode)
    q.observer_enabled = True
    for x in xs:
        q(x)
    q.observer_enabled = False
    q.init_from_observer()
    q.fake_quant_enabled = True
    assert q.group.tolist() == [1, 1, 0, 0] and q.observer.batches == []
    assert q.scale[1].item() == pytest.approx(top / 15)
    assert q.scale[0].item() == pytest.approx((0.5 if mode == "channel" else 1.0) / 15)
    with torch.no_grad():
        out = q(xs[0])
    assert out[0, 2, 0].item() == pytest.approx(top)  # 4 comes out as 4 (batch) or clipped to 2 (channel)


@pytest.mark.parametrize("observer", ["AvgMinMaxObserver", "AvgMSEObserver", "MinMaxObserver"])
def test_group_range_modes_agree_where_the_maths_says_so(observer):
    torch.manual_seed(0)
    xs = [torch.randn(2, 50, 6) * torch.tensor([0.1, 0.1, 1.0, 1.0, 5.0, 5.0]) for _ in range(3)]

    def scale(mode, groups):
        q = CAGFakeQuantize(OBSERVERS[observer](4, False, -1), bit=4, groups=groups, group_range=mode)
        q.observer_enabled = True
        for x in xs:
            q(x)
        q.observer_enabled = False
        q.init_from_observer()
        return q.scale
    assert torch.equal(scale("channel", 6), scale("batch", 6))  # one channel per group: the same range
    if observer == "MinMaxObserver":  # running min / max: the union over batches either way
        assert torch.equal(scale("channel", 3), scale("batch", 3))
    else:  # averaged: the mean of the group's per-batch maxima >= the max of its channels' mean maxima
        assert (scale("batch", 3) >= scale("channel", 3) * (1 - 1e-6)).all()
        assert not torch.equal(scale("batch", 3), scale("channel", 3))


def test_grouped_hluq_batch_range_hand_case():
    xs = [F.relu(x) for x in _sparse_batches()]
    lin = torch.nn.Linear(4, 2)
    for mode, want_hi in (("channel", [0.5, 2.0]), ("batch", [1.0, 4.0])):
        obs = HybridRangeObserver(bit=4, groups=2, group_range=mode)
        for x in xs:
            obs.set_layer(lin.weight, lin.bias)
            obs(x)
        lo, hi = obs._group_range(obs.channel_groups())
        assert obs.channel_groups().tolist() == [1, 1, 0, 0]
        assert hi.tolist() == pytest.approx(want_hi) and lo.tolist() == [0.0, 0.0]
        q = HLUQFakeQuantize(obs, bit=4)
        q.init_from_observer()
        assert obs.batches == []
        rr, gr, tr = obs.best()
        r = torch.tensor(want_hi) * tr  # s_uni from the group's range (hluq.py module docstring)
        assert q.scale.tolist() == pytest.approx((r * (1 - rr) / (15 * (1 - gr))).tolist())


def test_group_range_reaches_the_quantizers(lite):
    sam = copy.deepcopy(lite)
    quantize_sam(sam, build_context(load_qconfig(ROOT_EXP, ["ahcptq.HLUQ=true", "ahcptq.CAG=true",
                                                            "ahcptq.hluq_groups=4", "ahcptq.group_range=batch"])), True)
    qs = {n: m.quantizer for n, m in sam.named_modules() if n.endswith("input_quant")}
    lin2 = qs["mask_decoder.transformer.layers.1.mlp.lin2.input_quant"]
    q_proj = qs["mask_decoder.transformer.layers.1.self_attn.q_proj.input_quant"]
    assert isinstance(lin2, HLUQFakeQuantize) and lin2.observer.group_range == "batch" and lin2.observer.keep_batches
    assert isinstance(q_proj, CAGFakeQuantize) and q_proj.group_range == "batch" and q_proj.observer.keep_batches
    assert load_qconfig(ROOT_EXP).ahcptq.group_range == "channel"  # the default: what the measured recipes used
    sam = copy.deepcopy(lite)
    quantize_sam(sam, build_context(load_qconfig(ROOT_EXP, ["ahcptq.HLUQ=true", "ahcptq.CAG=true",
                                                            "ahcptq.hluq_groups=4"])), True)
    assert not any(getattr(m, "keep_batches", False) for m in sam.modules())  # the default keeps no batch ranges


def test_group_channels_hand_case():
    lo = torch.tensor([0.0, -0.1, 0.0, -1.0, -0.5, 0.0])
    hi = torch.tensor([1.0, 1.0, 1.1, 10.0, 9.0, 11.0])
    g = group_channels(lo, hi, 2)
    assert g.tolist() == [0, 0, 0, 1, 1, 1]  # the three small ranges share a group
    assert group_channels(lo, hi, 6).tolist() == list(range(6)) and set(group_channels(lo, hi, 1).tolist()) == {0}


# ---- smoothing ----------------------------------------------------------------------------------------------------
def test_smoothing_keeps_the_float_model_and_flattens_the_activations(lite):
    sam = copy.deepcopy(lite)
    seg = BoxPromptSegmenter(sam)
    s = calib_samples(1)[0]
    with torch.no_grad():
        ref = seg(s.image, s.boxes).low_res_logits

    def run():
        with torch.no_grad():
            seg(s.image, s.boxes)
    n, rep = smooth_sam(sam, True, run, 0.5)
    with torch.no_grad():
        out = seg(s.image, s.boxes).low_res_logits
    assert n == len(rep) == 3 * 10 + 7  # TinyViT: qkv, proj, fc1 of its 10 attention blocks; decoder: 7 out_proj
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert np.mean([r["act_range_after"] < r["act_range_before"] for r in rep]) > 0.8


def test_smoothing_is_exact_on_vit_b_random():
    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    seg = BoxPromptSegmenter(sam)
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 40, 30]], np.float32)
    with torch.no_grad():
        ref = seg(img, boxes).low_res_logits
        n, rep = smooth_sam(sam, True, lambda: seg(img, boxes), 0.8)
        out = seg(img, boxes).low_res_logits
    assert n == 3 * len(sam.image_encoder.blocks) + 7
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def _calibrated_linear(n_in: int, n_out: int, a_cfg: QuantizerConfig, x: torch.Tensor, conv: bool = False):
    """A QuantLinear (or, ``conv``, a 3x3 QuantConv2d) with W8 per tensor and input quantizer ``a_cfg``, calibrated
    on ``x`` and switched to quantization."""
    w_cfg = QuantizerConfig("FixedFakeQuantize", "MinMaxObserver", 8)
    layer = QuantConv2d.from_float(torch.nn.Conv2d(n_in, n_out, 3, padding=1), w_cfg, a_cfg) if conv else \
        QuantLinear.from_float(torch.nn.Linear(n_in, n_out), w_cfg, a_cfg)
    q = layer.input_quant.quantizer
    q.observer_enabled = True
    layer.calibrate_weight()
    layer(x)
    q.observer_enabled = False
    q.init_from_observer()
    q.fake_quant_enabled = layer.weight_quantizer.fake_quant_enabled = True
    return layer, q


# ---- log-space scale learning -------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["linear", "log"])
def test_first_adam_step_is_lr_in_the_chosen_space(space):
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    layer, q = _calibrated_linear(8, 4, QuantizerConfig("LSQFakeQuantize", "MinMaxObserver", 4), x)
    s0 = float(q.scale)
    recon = ReconSection(iters=1, scale_lr=0.01, scale_space=space, drop_prob=1.0)
    with torch.no_grad():
        tgt = torch.nn.functional.linear(x, layer.weight, layer.bias)
    cache = UnitCache([], torch.device("cpu"), torch.device("cpu"), 0)
    reconstruct_unit(layer, [((x,), {})], [((x,), {})], [tgt], cache, recon, torch.Generator().manual_seed(0), "t")
    s1 = float(q.scale)
    step = abs(math.log(s1 / s0)) if space == "log" else abs(s1 - s0)
    assert step == pytest.approx(0.01, rel=1e-3)  # Adam's first step is lr (per parameter) in its own space


# ---- mixed precision: per-module bit overrides --------------------------------------------------------------------
def test_bit_overrides_apply_by_module_name_pattern(lite):
    q = load_qconfig(ROOT_EXP, ["overrides=[{pattern: 'mask_decoder.transformer.layers.0.*', w_bit: 8, a_bit: 6}]"])
    sam = copy.deepcopy(lite)
    quantize_sam(sam, build_context(q), False)
    bits = {n: m.bit for n, m in sam.named_modules() if hasattr(m, "quant_min") and hasattr(m, "bit")}
    l0 = {n: b for n, b in bits.items() if n.startswith("mask_decoder.transformer.layers.0.")}
    rest = {n: b for n, b in bits.items() if n not in l0}
    assert l0 and all(b == (8 if "weight_quantizer" in n else 6) for n, b in l0.items())
    assert rest and all(b == 4 for b in rest.values())
    for bad, key in (("overrides=[{w_bit: 8}]", "overrides[0]"), ("overrides=[{pattern: x, bits: 8}]", "overrides[0]"),
                     ("overrides=[{pattern: x, a_bit: 1}]", "overrides[0].a_bit")):
        with pytest.raises(QConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_qconfig(ROOT_EXP, [bad])


# ---- save / load and the frozen path with the new quantizers ------------------------------------------------------
def test_hluq_cag_smooth_gptq_save_load_identical_and_frozen_path(lite, tmp_path):
    samples = calib_samples(1, max_boxes=2)
    opts = ["ptq4sam.BIG=false", "ptq4sam.AGQ=false", "ahcptq.HLUQ=true", "ahcptq.CAG=true", "smooth.enabled=true",
            "ahcptq.hluq_groups=2", "recon.iters=1", "recon.units=block", "recon.scale_lr=0.001", "recon.scale_space=log",
            "gptq.enabled=true", "w_qconfig.observer=MinMaxObserver"]  # (weight ranges: not what is tested here)
    q = load_qconfig(ROOT_EXP, opts)
    sam = copy.deepcopy(lite)
    seg = BoxPromptSegmenter(sam)
    info = quantize_segmenter(seg, samples, q, quant_encoder=False, device=torch.device("cpu"), log=lambda *a: None)
    kinds = [type(m) for m in sam.modules()]
    assert kinds.count(HLUQFakeQuantize) == 2 and kinds.count(CAGFakeQuantize) == 7 * 4 + 2  # 7 attentions, 2 MLPs
    assert len(info.methods["smooth"]) == 7  # decoder: v_proj -> out_proj of every attention
    assert info.methods["gptq"]["layers"] == 2 * 2 + 7 * 4 and info.methods["gptq"]["proxy_ratio_median"] < 1  # MLPs, attentions
    img, boxes = samples[0].image, samples[0].boxes
    with torch.no_grad():
        frozen = seg(img, boxes).low_res_logits
        unfreeze(sam)
        full = seg(img, boxes).low_res_logits
        freeze(sam)
    assert torch.equal(frozen, full)
    save_quantized(sam, tmp_path / "q.pth", q.to_dict(), False, info.to_dict())
    fresh = copy.deepcopy(lite)
    quantize_sam(fresh, build_context(q), False)
    load_quantized(fresh, tmp_path / "q.pth", torch.device("cpu"), q, False)
    with torch.no_grad():
        again = BoxPromptSegmenter(fresh)(img, boxes).low_res_logits
    assert torch.equal(again, frozen)
    from ptq4sam.checkpoint import quant_state, restore_quant_state  # the --resume state carries GPTQ's weights too

    resumed = copy.deepcopy(lite)
    quantize_sam(resumed, build_context(q), False)
    restore_quant_state(resumed, quant_state(sam), "recon_state.pt")
    with torch.no_grad():
        assert torch.equal(BoxPromptSegmenter(resumed)(img, boxes).low_res_logits, frozen)
    assert sum(n.endswith("gptq_weight") for n, _ in resumed.named_buffers()) == info.methods["gptq"]["layers"]
    other = load_qconfig(ROOT_EXP, opts + ["ahcptq.groups=2"])
    with pytest.raises(Exception, match="ahcptq.groups"):
        load_quantized(copy.deepcopy(fresh), tmp_path / "q.pth", torch.device("cpu"), other, False)


@pytest.mark.parametrize("kind", ["cag", "hluq", "cag-conv", "hluq-conv"])
def test_new_quantizers_export_to_onnx(kind, tmp_path):
    from ptq4sam.deploy.onnx_export import export_mode

    torch.manual_seed(0)
    conv = kind.endswith("conv")
    a_cfg = QuantizerConfig("CAGFakeQuantize", "AvgMinMaxObserver", 8, ch_axis=1 if conv else -1,
                            quantizer_kwargs={"groups": 2}) \
        if kind.startswith("cag") else QuantizerConfig("HLUQFakeQuantize", "HybridRangeObserver", 4,
                                                       ch_axis=1 if conv else -1,
                                                       observer_kwargs={"groups": 2 if conv else 1})
    ranges = torch.tensor([0.1, 0.1, 1, 1, 5, 5])
    x = torch.randn(1, 6, 5, 5) * ranges.reshape(1, 6, 1, 1) if conv else torch.randn(1, 5, 6) * ranges
    if kind.startswith("hluq"):
        x = F.gelu(x)
    layer, aq = _calibrated_linear(6, 3, a_cfg, x, conv)
    with torch.no_grad():
        ref = layer(x)
        with export_mode(layer) as recs:
            torch.onnx.export(layer, (x,), str(tmp_path / "l.onnx"), dynamo=False, opset_version=17)
    import onnxruntime as ort

    so = ort.SessionOptions()  # the QDQ graph as written (ORT's fusions treat a per-channel activation DQ before a
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # MatMul approximately: ~1e-2 off)
    sess = ort.InferenceSession(str(tmp_path / "l.onnx"), so)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(out, ref.numpy(), atol=1e-5)
    if kind.startswith("cag"):
        assert any(r.per_channel for r in recs if r.kind == "activation-qdq")
        assert len(set(aq._eval_params()[0].tolist())) == 2
    else:
        assert [r.kind for r in recs if r.kind.startswith("emulated")] == ["emulated-hluq"]


def test_hluq_and_cag_config_errors_name_the_key():
    for opt, key in (("ahcptq.groups=0", "ahcptq.groups"), ("ahcptq.grid_rates=[1.5]", "ahcptq.grid_rates"),
                     ("smooth.alpha=2", "smooth.alpha"), ("smooth.folds=[x]", "smooth.folds"),
                     ("recon.scale_space=exp", "recon.scale_space"),
                     ("ahcptq.group_range=tensor", "ahcptq.group_range")):
        with pytest.raises(QConfigError, match=key):
            load_qconfig(ROOT_EXP, [opt])


def test_average_bits_and_greedy_overrides_hand_case():
    from ptq4sam.mixed import average_bits, choose_overrides

    macs = {"a.x": 100, "b.y": 300, "c.z": 600}
    assert average_bits({"a.x": (8, 8), "b.y": (4, 4), "c.z": (4, None)}, macs) == (4.4, 0.1 * 8 + 0.3 * 4 + 0.6 * 32)
    units = [{"name": "a", "layers": ["a.x"], "error": 1.0}, {"name": "b", "layers": ["b.y"], "error": 2.0},
             {"name": "c", "layers": ["c.z"], "error": 3.0}]
    # error per MAC: a 0.01, b 0.0067, c 0.005; raising a costs 0.4 bits, b 1.2, c 2.4 (4 -> 8 bits)
    ov = choose_overrides(units, macs, 4, 8, 4.5)
    assert [o["pattern"] for o in ov] == ["a", "a.*"] and all(o["w_bit"] == o["a_bit"] == 8 for o in ov)
    assert [o["pattern"] for o in choose_overrides(units, macs, 4, 8, 5.7)] == ["a", "a.*", "b", "b.*"]


def test_mixed_runs_are_labelled_with_their_average_bits_never_w4a4():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("ba", Path(__file__).parents[1] / "tools" / "benchmark_accuracy.py")
    ba = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ba)
    assert ba.wa_label({"method": "ptq4sam", "bits": 4, "mixed": True, "avg_w_bits": 4.41, "avg_a_bits": 4.5}) == \
        "mixed: avg W4.41 / A4.50"
    assert ba.wa_label({"method": "ptq4sam", "bits": 4, "mixed": False}) == "W4A4"
    from ptq4sam.mixed import bits_label  # the CLI's label (test_quant.py's table)

    assert bits_label(4, 4, (4.41, 4.5), mixed=True) == "mixed: avg W4.41 / A4.50"
    assert bits_label(4, 4, None, mixed=True) == "mixed (base W4A4)" and bits_label(6, 8) == "W6A8"
    noisy = [{"rel": 1e-3, "seed": k, "segm_mAP": v} for k, v in enumerate([0.1, 0.2, 0.3])] + \
        [{"rel": 1e-6, "seed": 0, "segm_mAP": 0.25}]
    assert ba.perturb_summary(noisy) == [{"rel": 1e-6, "n": 1, "mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25},
                                         {"rel": 1e-3, "n": 3, "mean": 0.2, "std": 0.1, "min": 0.1, "max": 0.3}]


def test_shipped_w4a4_recipe_is_the_measured_combination():
    opts = ["ptq4sam.BIG=false", "ptq4sam.AGQ=false", "a_qconfig.observer=AvgMSEObserver", "ahcptq.HLUQ=true",
            "ahcptq.CAG=true", "smooth.enabled=true", "recon.scale_lr=0.001", "recon.scale_space=log",
            "ahcptq.convs=true", "ahcptq.cag_observer=AvgMSEObserver", "ahcptq.top_rates=[1.0,0.75,0.5,0.35]",
            "ahcptq.hluq_groups=4", "recon.round_mode=nearest", "gptq.enabled=true", "ptq4sam.AGQ=true"]
    # ^ the switches of the recipe, one by one on the paper's CPU-budget W4A4 yaml
    best = load_qconfig("exp/recipes/w4a4-cpu.yaml").to_dict()
    measured = load_qconfig(ROOT_EXP, opts).to_dict()
    assert {k for k in best if best[k] != measured[k]} == {"source"}
    full = load_qconfig("exp/recipes/w4a4.yaml").to_dict()
    assert {k for k in full if full[k] != best[k]} == {"source", "calibrate", "recon", "ptq4sam"}
    assert full["recon"]["iters"] == 20000 and full["ptq4sam"]["agq_images"] == 0


def test_hluq_conv_scoring_crops_are_slices_of_the_map_and_repeatable():
    from ptq4sam.quantization.hluq import spatial_crops

    x = torch.randn(2, 3, 40, 50)
    assert spatial_crops(x, 2 * 40 * 50) is x  # small enough: the whole map
    c = spatial_crops(x, 2048, size=16)
    assert c.shape == (8, 3, 16, 16) and torch.equal(c, spatial_crops(x.clone(), 2048, size=16))
    for crop in c:  # each crop is a window of one image of the batch
        assert any(torch.equal(crop, x[b, :, i:i + 16, j:j + 16])
                   for b in range(2) for i in range(25) for j in range(35))


def test_layer_errors_tool_measures_each_quantizer_alone():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("le", Path(__file__).parents[1] / "tools" / "layer_errors.py")
    le = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(le)
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    layer, q = _calibrated_linear(8, 3, QuantizerConfig("LSQFakeQuantize", "MinMaxObserver", 3), x)
    model = torch.nn.Sequential(layer)
    with torch.no_grad():
        wq = layer.weight_quantizer(layer.weight)  # (on after _calibrated_linear; local_errors switches all off)
        ref = F.linear(x, layer.weight, layer.bias)
        xq = torch.fake_quantize_per_tensor_affine(x, float(q.scale), int(q.zero_point), 0, 7)
    got = le.local_errors(model, lambda: model(x))["0"]
    with torch.no_grad():
        want_in = float((F.linear(xq, layer.weight, layer.bias) - ref).pow(2).mean() / ref.var())
        want_w = float((F.linear(x, wq, layer.bias) - ref).pow(2).mean() / ref.var())
    assert got["input"] == pytest.approx(want_in, rel=1e-5) and got["weight"] == pytest.approx(want_w, rel=1e-5)
    assert got["input"] > 0 and got["weight"] > 0 and got["input_quantizer"] == "LSQFakeQuantize"
    # a GPTQ model: the forwards use the float weight, the layer's quantized weight is Q(GPTQ's source weight)
    w_float = layer.weight.detach().clone()
    w_src = layer.weight.detach() + 0.3 * torch.randn_like(layer.weight)
    layer.set_quant_source(w_src)
    with torch.no_grad():
        layer.weight_quantizer.fake_quant_enabled = True  # (local_errors switched it off)
        w_gptq = layer.weight_quantizer(w_src)
        want_g = float((F.linear(x, w_gptq, layer.bias) - ref).pow(2).mean() / ref.var())
    assert not torch.equal(w_gptq, wq)
    got = le.local_errors(model, lambda: model(x))["0"]
    assert got["weight"] == pytest.approx(want_g, rel=1e-5) and got["input"] == pytest.approx(want_in, rel=1e-5)
    assert torch.equal(layer.weight, w_float)  # never touched
