"""Gradients of the learned quantization parameters, against stated formulas on hand values: LSQ's scale gradient
(PyTorch's own LSQ kernel as the independent reference), AGQ's and HLUQ's log-domain scales (the LSQ form, non-zero in
range), LSQ+'s zero point in a reconstruction, the log-space Adam step, and AGQ's level count."""
import math

import pytest
import torch

from ptq4sam.qconfig import ReconSection, load_qconfig
from ptq4sam.quantization import (
    AGQFakeQuantize,
    LSQFakeQuantize,
    LSQPlusFakeQuantize,
    MinMaxObserver,
    QuantizerConfig,
    QuantLinear,
    hluq_quantize,
)
from ptq4sam.quantization.logq import agq_nonzero_levels, agq_quantize, lsq_form
from ptq4sam.reconstruction import UnitCache, reconstruct_unit


def _per_element_grads(fn, x, s):
    """d fn(x, s)_i / d x_i and d fn(x, s)_i / d s for every element i (one backward each)."""
    gx, gs = [], []
    for i in range(x.numel()):
        xx, ss = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        fn(xx, ss).reshape(-1)[i].backward()
        gx.append(float(xx.grad.reshape(-1)[i]))
        gs.append(float(ss.grad.sum()))
    return torch.tensor(gx), torch.tensor(gs)


def test_lsq_form_on_a_uniform_grid_is_pytorchs_lsq_gradient():
    torch.manual_seed(0)
    x = torch.randn(300) * 2
    s, zp = torch.tensor([0.3]), torch.tensor([7.0])
    xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    y_ref = torch._fake_quantize_learnable_per_tensor_affine(xr, sr, zp, 0, 15, 1.0)
    g = torch.randn(300)
    (y_ref * g).sum().backward()
    x2, s2 = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    with torch.no_grad():
        code = torch.round(x / s) + zp
        q = (torch.clamp(code, 0, 15) - zp) * s
    y = lsq_form(q, x2, s2, (code >= 0) & (code <= 15))
    (y * g).sum().backward()
    assert torch.equal(y.detach(), q)
    torch.testing.assert_close(x2.grad, xr.grad)
    torch.testing.assert_close(s2.grad, sr.grad, rtol=1e-5, atol=1e-6)


def test_agq_scale_gradient_is_the_lsq_form_and_non_zero_in_range():
    # tau = 2, s = 0.8, 2 bits (paper: 4 non-zero levels): k = round(-2 log2(x / 0.8))
    x = torch.tensor([0.6, 0.3, 0.2, 0.9])
    s = torch.tensor(0.8)
    # 0.6: k = round(0.83) = 1 -> 0.8 * 2^-0.5; 0.3: k = round(2.83) = 3 -> 0.8 * 2^-1.5; 0.2: k = 4 >= 4 -> 0 (flushed);
    # 0.9 > s: saturated at s
    want = torch.tensor([0.8 * 2 ** -0.5, 0.8 * 2 ** -1.5, 0.0, 0.8])
    torch.testing.assert_close(agq_quantize(x, s, 2, 4), want)
    gx, gs = _per_element_grads(lambda a, b: agq_quantize(a, b, 2, 4), x, s)
    assert torch.equal(gx, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # in range: (q - x) / s; saturated: q / s = 1; flushed: 0
    torch.testing.assert_close(gs, torch.tensor([(want[0] - 0.6) / 0.8, (want[1] - 0.3) / 0.8, 0.0, 1.0]))
    assert (gs[:2].abs() > 1e-3).all()  # a straight-through rounding inside the log gives exactly 0 here
    # the fake quantizer's learnable scale gets the same gradient
    q = AGQFakeQuantize(MinMaxObserver(2), bit=2, tau=2)
    q.set_qparams(torch.tensor([0.8]), torch.zeros(1))
    q.initialized = q.fake_quant_enabled = True
    q(x).sum().backward()
    assert float(q.scale.grad) == pytest.approx(float(gs.sum()), rel=1e-6)


def test_hluq_split_point_gradient_is_the_lsq_form_in_the_log_branch():
    # fp_min 0, split s_log = 0.4, s_uni = 0.1, 2 log levels: x' <= 0.4 -> 0.4 * 2^-n (n = 0, 1), n >= 2 -> 0
    x = torch.tensor([0.35, 0.21, 0.05, 0.6])
    s_log = torch.tensor(0.4)
    f = lambda a, b: hluq_quantize(a, torch.tensor(0.0), b, torch.tensor(0.1), 2, 6)  # noqa: E731
    want = torch.tensor([0.4, 0.2, 0.0, 0.6])  # 0.35 -> n 0; 0.21 -> n round(0.93) = 1; 0.05 -> n 3 -> 0; 0.6 uniform
    torch.testing.assert_close(f(x, s_log), want)
    gx, gs = _per_element_grads(f, x, s_log)
    torch.testing.assert_close(gx, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    # log branch: (q - x) / s_log; flushed: 0; uniform branch: s_log + u * s_uni with u = (x - s_log) / s_uni: 0
    torch.testing.assert_close(gs, torch.tensor([(0.4 - 0.35) / 0.4, (0.2 - 0.21) / 0.4, 0.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bit", [2, 3, 4])
def test_agq_level_count(bit):
    x = torch.cat([torch.linspace(0, 1, 200001), torch.logspace(-30, 0, 20001)])
    for mode, n_values in (("paper", 2 ** bit + 1), ("exact", 2 ** bit)):
        q = AGQFakeQuantize(MinMaxObserver(bit), bit=bit, tau=1, levels=mode)
        q.set_qparams(torch.tensor([1.0]), torch.zeros(1))
        q.initialized = q.fake_quant_enabled = True
        with torch.no_grad():
            assert torch.unique(q(x)).numel() == n_values, mode
        assert q.levels == agq_nonzero_levels(bit, mode)
    assert load_qconfig("exp/demo/config44.yaml").ptq4sam.agq_levels == "paper"  # the paper default, labelled
    assert load_qconfig("exp/demo/config44.yaml", ["ptq4sam.agq_levels=exact"]).ptq4sam.agq_levels == "exact"


def _linear_unit(a_cfg, x):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(x.shape[-1], 5),
                                   QuantizerConfig("FixedFakeQuantize", "MinMaxObserver", 8, False, 0), a_cfg)
    layer.calibrate_weight()
    q = layer.input_quant.quantizer
    q.observer(x)
    q.init_from_observer()
    q.fake_quant_enabled = layer.weight_quantizer.fake_quant_enabled = True
    return layer, q


def _reconstruct(layer, x, recon):
    with torch.no_grad():
        tgt = torch.nn.functional.linear(x, layer.weight, layer.bias)
    cache = UnitCache([], torch.device("cpu"), torch.device("cpu"), 0)
    return reconstruct_unit(layer, [((x,), {})], [((x,), {})], [tgt], cache, recon, torch.Generator().manual_seed(0),
                            "t")


def test_lsq_plus_zero_point_is_learned_in_reconstruction():
    x = torch.randn(64, 8) * 2 + 1
    layer, q = _linear_unit(QuantizerConfig("LSQPlusFakeQuantize", "MinMaxObserver", 3), x)
    assert isinstance(q, LSQPlusFakeQuantize)
    z0, s0 = q.zero_point.detach().clone(), q.scale.detach().clone()
    info = _reconstruct(layer, x, ReconSection(iters=3, scale_lr=0.05, drop_prob=1.0))
    assert info["act_offsets"] == 1 and info["act_scales"] == 1
    assert not torch.equal(q.zero_point.detach(), z0) and not torch.equal(q.scale.detach(), s0)
    assert not q.zero_point.requires_grad  # switched off again after the unit
    # a symmetric grid keeps its zero point at 0: nothing to learn
    layer, q = _linear_unit(QuantizerConfig("LSQPlusFakeQuantize", "MinMaxObserver", 3, True), x)
    info = _reconstruct(layer, x, ReconSection(iters=3, scale_lr=0.05, drop_prob=1.0))
    assert info["act_offsets"] == 0 and float(q.zero_point) == 0.0
    # plain LSQ has no offset to learn
    layer, q = _linear_unit(QuantizerConfig("LSQFakeQuantize", "MinMaxObserver", 3), x)
    assert isinstance(q, LSQFakeQuantize) and q.learnable_offsets() == []


@pytest.mark.parametrize("space", ["linear", "log"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_first_adam_step_follows_the_chain_rule(space, sign):
    """Adam's first step is -lr * sign(gradient) in its own space; LSQ uses |s|, so a negative stored scale must move
    its magnitude the same way (log space: s = sign * exp(l), dL/dl = dL/ds * s)."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    layer, q = _linear_unit(QuantizerConfig("LSQFakeQuantize", "MinMaxObserver", 3), x)
    with torch.no_grad():
        q.scale.mul_(sign)
    a0 = float(q.scale.abs())
    # the gradient of the reconstruction loss w.r.t. the magnitude |s|, through an explicit LSQ formula
    mag = torch.tensor(a0, requires_grad=True)
    zp = float(q.zero_point)
    g = q.grad_factor(x)
    scale = (mag - mag * g).detach() + mag * g
    code = torch.clamp((torch.round(x / scale) - x / scale).detach() + x / scale + zp, q.quant_min, q.quant_max)
    xq = (code - zp) * scale
    with torch.no_grad():
        tgt = torch.nn.functional.linear(x, layer.weight, layer.bias)
    (torch.nn.functional.linear(xq, layer.qweight(), layer.bias) - tgt).pow(2).sum(1).mean().backward()
    direction = -math.copysign(1.0, float(mag.grad))
    _reconstruct(layer, x, ReconSection(iters=1, scale_lr=0.01, scale_space=space, drop_prob=1.0))
    a1 = float(q.scale.abs())
    assert math.copysign(1.0, float(q.scale)) == sign  # the sign is kept
    if space == "log":
        assert math.log(a1 / a0) == pytest.approx(0.01 * direction, rel=1e-3)
    else:  # linear: the stored value moves by lr; its magnitude by sign * lr
        assert (float(q.scale) - sign * a0) == pytest.approx(0.01 * direction * sign, rel=1e-3)


def test_log_space_steps_use_each_steps_own_gradient():
    """Several log-space steps against a hand loop: Adam on l = log|s| fed dL/dl = dL/ds * s of the current step only
    (a scale's gradient must not add up over the steps), with the reconstruction's cosine learning-rate schedule."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    layer, q = _linear_unit(QuantizerConfig("LSQFakeQuantize", "MinMaxObserver", 3), x)
    iters, lr = 5, 0.05
    with torch.no_grad():
        tgt = torch.nn.functional.linear(x, layer.weight, layer.bias)
    ref_layer, ref_q = _linear_unit(QuantizerConfig("LSQFakeQuantize", "MinMaxObserver", 3), x)
    assert torch.equal(ref_q.scale, q.scale)
    log_s = torch.nn.Parameter(ref_q.scale.detach().abs().log())
    opt = torch.optim.Adam([log_s], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    ref_q.scale.requires_grad_(True)
    trail = []
    for _ in range(iters):
        with torch.no_grad():
            ref_q.scale.copy_(log_s.detach().exp())
        out = ref_layer(x)
        loss = (out - tgt).pow(2).sum(1).mean()  # the 'paper' loss: summed over dim 1, mean over the rest
        (g_s,) = torch.autograd.grad(loss, [ref_q.scale])
        log_s.grad = g_s * ref_q.scale.detach()
        opt.step()
        sched.step()
        trail.append(float(log_s.detach().exp()))
    _reconstruct(layer, x, ReconSection(iters=iters, scale_lr=lr, scale_space="log", drop_prob=1.0))
    assert len(set(trail)) == iters  # the scale moved at every step
    assert float(q.scale) == pytest.approx(trail[-1], rel=1e-5)
