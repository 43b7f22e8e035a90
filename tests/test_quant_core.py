"""Quantization core: numbers against hand-computed references and brute force (torch only)."""
import itertools

import pytest
import torch

from ptq4sam.quantization import (
    AdaRoundFakeQuantize,
    AGQFakeQuantize,
    FixedFakeQuantize,
    LSQFakeQuantize,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    agq_quantize,
    qparams_from_range,
)
from ptq4sam.quantization.observer import fake_quant_ref, qrange


def fixed(bit=4, scale=0.5, zp=2.0, sym=False, ch_axis=-1):
    q = FixedFakeQuantize(MinMaxObserver(bit, sym, ch_axis), bit=bit, symmetric=sym, ch_axis=ch_axis)
    q.set_qparams(torch.tensor([scale]), torch.tensor([zp]))
    q.initialized = True
    q.fake_quant_enabled = True
    return q


def test_uniform_fake_quant_matches_hand_computation():
    x = torch.tensor([-2.0, -0.3, 0.26, 7.0])
    # x/s = [-4, -0.6, 0.52, 14] -> round + zp = [-2, 1, 3, 16] -> clamp [0, 15] -> (q - 2) * 0.5
    expected = torch.tensor([-1.0, -0.5, 0.5, 6.5])
    q = fixed()
    with torch.no_grad():  # fused evaluation kernel
        assert torch.equal(q(x), expected)
    with torch.enable_grad():  # differentiable path used in reconstruction
        assert torch.equal(q(x.clone().requires_grad_(True)).detach(), expected)


@pytest.mark.parametrize("qmin,qmax", [(0, 255), (-128, 127), (0, 15), (-8, 7), (0, 65535)])
def test_fast_fake_quantize_equals_atens_bit_for_bit(qmin, qmax):
    """The evaluation path's vectorised fake quantization gives ATen's values bit for bit: per tensor (zero points
    inside and outside the grid) and per channel on any axis, with exact .5 ties (ATen rounds them half to even),
    values far outside the grid, and a channels-last tensor (its memory format kept)."""
    from ptq4sam.quantization.fake_quant import fake_quantize_affine

    g = torch.Generator().manual_seed(qmax)
    for trial in range(40):
        scale = torch.rand(1, generator=g) * 10 ** float(torch.empty(1).uniform_(-4, 1, generator=g)) + 1e-6
        zp = torch.randint(qmin - 20, qmax + 21, (1,), generator=g).to(torch.int32)
        x = torch.randn(2000, generator=g) * float(scale) * (qmax - qmin)
        x[:600] = (torch.randint(-3 * qmax - 9, 3 * qmax + 9, (600,), generator=g).float() + 0.5) * scale
        x[600:610] = torch.tensor([1e30, -1e30, 3e9, -3e9, 0.0, -0.0, 1e-30, -1e-30, 2.0 ** 24, -(2.0 ** 24)])
        got, want = fake_quantize_affine(x, scale, zp, qmin, qmax), torch.fake_quantize_per_tensor_affine(
            x, scale, zp, qmin, qmax)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), trial
        xs = torch.randn(2, 5, 6, 7, generator=g) * 40
        axis = trial % 4
        n = xs.shape[axis]
        sc = torch.rand(n, generator=g) * 0.5 + 1e-3
        zc = torch.randint(qmin, qmax + 1, (n,), generator=g).to(torch.int32)
        shape = [1, 1, 1, 1]
        shape[axis] = n
        xs[0] = ((torch.randint(-99, 99, xs.shape, generator=g).float() + 0.5) * sc.reshape(shape))[0]
        xs = xs.contiguous(memory_format=torch.channels_last)
        got = fake_quantize_affine(xs, sc, zc, qmin, qmax, axis)
        want = torch.fake_quantize_per_channel_affine(xs, sc, zc, axis, qmin, qmax)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), trial
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_fast_fake_quantize_keeps_nan_and_leaves_gradients_to_aten():
    from ptq4sam.quantization.fake_quant import fake_quantize_affine

    s, z = torch.tensor([0.5]), torch.tensor([3], dtype=torch.int32)
    out = fake_quantize_affine(torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]), s, z, 0, 15)
    assert torch.isnan(out[0]) and out[1:].tolist() == [6.0, -1.5, 1.0]  # (15 - 3) * 0.5, (0 - 3) * 0.5
    x = torch.tensor([-9.0, 0.7, 2.6, 9.0], requires_grad=True)
    fake_quantize_affine(x, s, z, 0, 15).sum().backward()  # ATen's straight-through gradient: 1 inside the grid
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_fast_fake_quantize_leaves_other_parameters_to_aten():
    """Parameters outside ATen's tensor contract or the fast path's exact range go to ATen, with its results and its
    errors: a float zero point (ATen rounds after adding it per channel, truncates it per tensor), a (1, 1) scale,
    a per-tensor zero point beyond 2^24, a per-channel zero point outside the grid (refused)."""
    from ptq4sam.quantization.fake_quant import aten_fake_quantize, fake_quantize_affine

    x = torch.tensor([[0.5, 1.5, 2.5, -3.5]])
    i32 = torch.int32
    cases = [(torch.tensor([1.0]), torch.tensor([1.0]), 0, 15, 0),  # float zero point per channel
             (torch.tensor([1.0]), torch.tensor([2.7]), 0, 15, -1),  # float zero point per tensor
             (torch.tensor([[0.5]]), torch.tensor([[3]], dtype=i32), 0, 15, -1),  # a (1, 1) scale
             (torch.tensor([0.5]), torch.tensor([2 ** 24 + 1], dtype=i32), -(2 ** 30), 2 ** 30, -1)]
    for scale, zp, qmin, qmax, axis in cases:
        want = aten_fake_quantize(x, scale, zp, qmin, qmax, axis)
        got = fake_quantize_affine(x, scale, zp, qmin, qmax, axis)
        assert got.shape == want.shape and torch.equal(got, want), (scale, zp, got, want)
    with pytest.raises(RuntimeError, match="zero_point"):
        fake_quantize_affine(x.t(), torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 3, 16, 2], dtype=torch.int32),
                             0, 15, 0)


def test_qparams_from_range_hand_values():
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), bit=2, symmetric=False)
    assert s.item() == pytest.approx(4 / 3) and z.item() == 1.0  # zp = 0 - round(-1 / (4/3)) = round(0.75)
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), bit=4, symmetric=True)
    assert s.item() == pytest.approx(3 / 7.5) and z.item() == 0.0  # absmax / ((qmax - qmin) / 2)
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15)


def test_per_channel_quant_any_axis():
    x = torch.randn(3, 5, 4)
    q = FixedFakeQuantize(MinMaxObserver(8, False, 1), bit=8, ch_axis=1)
    q.observer(x)
    q.init_from_observer()
    q.fake_quant_enabled = True
    scale, zp = q.scale.reshape(1, 5, 1), q.zero_point.reshape(1, 5, 1)
    ref = fake_quant_ref(x, scale, zp, 0, 255)
    with torch.no_grad():
        assert torch.allclose(q(x), ref, atol=1e-6)
    assert torch.allclose(q(x.requires_grad_(True)).detach(), ref, atol=1e-6)


def test_shrink_mse_observer_equals_brute_force():
    torch.manual_seed(1)
    w = torch.randn(6, 40) * torch.linspace(0.1, 3, 6)[:, None]
    w[2, 3] = 9.0  # an outlier the search should clip
    obs = MSEObserver(bit=4, symmetric=False, ch_axis=0, p=2.4, num_candidates=50, search="shrink")
    obs(w)
    qmin, qmax = qrange(4, False)
    for c in range(6):
        lo, hi = w[c].min(), w[c].max()
        best, best_err = None, float("inf")
        for k in range(1, 51):  # the same candidates, one at a time
            r = k / 50
            s, z = qparams_from_range(lo * r, hi * r, 4, False)
            err = (fake_quant_ref(w[c], s, z, qmin, qmax) - w[c]).abs().pow(2.4).mean().item()
            if err < best_err - 1e-12:
                best, best_err = (lo * r, hi * r), err
        assert obs.min_val[c].item() == pytest.approx(best[0].item(), rel=1e-5)
        assert obs.max_val[c].item() == pytest.approx(best[1].item(), rel=1e-5)
    assert obs.max_val[2] < 9.0  # the outlier channel was clipped


def test_percentile_and_minmax_observers():
    x = torch.arange(1001, dtype=torch.float32) - 500
    o = PercentileObserver(8, percentile=99.0)
    o(x)
    assert o.min_val.item() == pytest.approx(-490.0) and o.max_val.item() == pytest.approx(490.0)
    m = MinMaxObserver(8)
    m(x)
    m(x * 2)
    assert (m.min_val.item(), m.max_val.item()) == (-1000.0, 1000.0)


def test_adaround_soft_init_and_hardening():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    obs = MinMaxObserver(4, False, 0)
    q = AdaRoundFakeQuantize(obs, bit=4, ch_axis=0)
    obs(w * 1.5)  # a range wider than the weights: no element sits on the clamp boundary
    q.init_from_observer()
    q.init_alpha(w)
    q.fake_quant_enabled = True
    s = q.scale.reshape(-1, 1)
    zp = q.zero_point.reshape(-1, 1)
    with torch.no_grad():
        soft = q(w)  # h(alpha) == w/s - floor(w/s): the soft weight is the float weight (inside the range)
        assert torch.allclose(soft, w, atol=1e-5)
        q.alpha.add_(torch.randn_like(q.alpha))
        q.harden()
        hard = q(w)
    floor = torch.clamp(torch.floor(w / s) + zp, 0, 15)
    up = torch.clamp(torch.floor(w / s) + 1 + zp, 0, 15)
    levels = hard / s + zp
    is_floor = torch.isclose(levels, floor, atol=1e-4)
    is_up = torch.isclose(levels, up, atol=1e-4)
    assert bool((is_floor | is_up).all())
    assert torch.equal(is_up & ~is_floor, (q.alpha >= 0) & ~torch.isclose(floor, up))
    rtn = AdaRoundFakeQuantize(obs, bit=4, ch_axis=0, round_mode="nearest")
    rtn.set_qparams(q.scale, q.zero_point)
    rtn.initialized = rtn.fake_quant_enabled = True
    with torch.no_grad():
        assert torch.allclose(rtn(w), fake_quant_ref(w, s, zp, 0, 15), atol=1e-6)


def test_lsq_scale_gets_gradient_and_qdrop_mixes():
    q = LSQFakeQuantize(MinMaxObserver(4), bit=4)
    x = torch.randn(1000)
    q.observer(x)
    q.init_from_observer()
    q.fake_quant_enabled = True
    (q(x) - x).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().item() > 0
    q.drop_prob = 0.5
    with torch.no_grad():
        y = q(x)
        xq = q.quantize(x)
    kept_float = (y == x) & (xq != x)
    assert 0.3 < kept_float.float().mean().item() < 0.7
    q.drop_prob = 1.0
    with torch.no_grad():
        assert torch.equal(q(x), xq)


@pytest.mark.parametrize("ch_axis", [-1, 1])
def test_fused_qdrop_fake_quant_equals_the_autograd_formula(ch_axis):
    """Reconstruction with fixed activation ranges runs QDrop + fake quantization as one fused op; its output and its
    straight-through gradient equal where(mask, formula, x) with the same random mask (channels-last input)."""
    from ptq4sam.quantization.fake_quant import qdrop_mask

    torch.manual_seed(0)
    x0 = (torch.randn(2, 6, 5, 7) * 3).contiguous(memory_format=torch.channels_last)
    q = FixedFakeQuantize(MinMaxObserver(4, False, ch_axis), bit=4, ch_axis=ch_axis)
    q.observer(x0 * 0.5)  # ranges narrower than the data: some elements are clamped
    q.init_from_observer()
    q.fake_quant_enabled, q.drop_prob = True, 0.5
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(7)
    y = q(x)
    (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
    torch.manual_seed(7)
    m = qdrop_mask(x0.shape, 0.5, like=x0)
    shape = [1] * 4
    if ch_axis != -1:
        shape[ch_axis] = -1
    s, z = q.scale.reshape(shape), q.zero_point.reshape(shape)
    ref = torch.where(m, (torch.clamp(torch.round(x0 / s) + z, 0, 15) - z) * s, x0)
    # straight-through gradient: 1, except 0 where the element was quantized and its integer fell outside [0, 15]
    # (the autograd formula's round_ste adds float error there: 9 - 8.754 + 8.754 can exceed 9 and lose the gradient)
    inside = (torch.round(x0 / s) + z >= 0) & (torch.round(x0 / s) + z <= 15)
    ref_grad = torch.where(m & ~inside, 0.0, torch.arange(x0.numel()).reshape(x0.shape).float())
    assert torch.allclose(y, ref, atol=1e-6) and torch.equal(x.grad, ref_grad)
    assert (x.grad == 0).any() and 0.3 < m.float().mean() < 0.7  # some quantized elements were clamped
    assert m.stride() == x0.stride()  # drawn in the input's memory layout


def test_agq_formula_hand_values():
    x = torch.tensor([1.0, 0.5, 0.3, 0.01, 2.0])
    # tau=2, s=1, 3 bits: x_int = round(-2 log2 x) = [0, 2, 3 (3.47), 13 (>= 8 -> 0), -2 -> 0 (saturates)]
    expected = torch.tensor([1.0, 0.5, 2 ** -1.5, 0.0, 1.0])
    assert torch.allclose(agq_quantize(x, torch.tensor(1.0), 2, 8), expected)
    q = AGQFakeQuantize(MinMaxObserver(3), bit=3, tau=2)
    q.set_qparams(torch.tensor([1.0]), torch.zeros(1))
    q.initialized = q.fake_quant_enabled = True
    with torch.no_grad():
        assert torch.allclose(q(x), expected)
    # tau=1, s=0.5: x_int = round(-log2(x/0.5)) = [-1->0, 0, 1 (0.74), 6 (5.6)]
    assert torch.allclose(agq_quantize(torch.tensor([1.0, 0.5, 0.3, 0.01]), torch.tensor(0.5), 1, 8),
                          torch.tensor([0.5, 0.5, 0.25, 0.5 * 2 ** -6]))


def test_agq_search_finds_the_known_tau():
    from ptq4sam.agq import search_tau

    torch.manual_seed(0)
    k = torch.randint(0, 8, (2, 4, 6, 10)).float()
    attn = 2 ** (-k / 2)  # every value on the tau=2 grid (8 levels): tau=2, s=1 is exact
    v = torch.randn(2, 4, 10, 5)
    res = search_tau([(attn, v)], bit=3, taus=(1, 2, 4), scale_ratios=(1.0, 0.8, 0.6))
    assert res["tau"] == 2 and res["scale"] == pytest.approx(1.0) and res["error"] < 1e-8
    assert res["error_per_tau"][1] > 1e-3 and res["error_per_tau"][4] > 1e-3


def test_agq_candidate_errors_equal_the_formula():
    """The search's one-buffer evaluation (log2 taken once) equals the AGQ formula candidate by candidate."""
    from ptq4sam.agq import agq_errors, candidate_grid

    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(2, 4, 9, 33) * 3, -1)
    v = torch.randn(2, 4, 33, 8)
    t, s = candidate_grid(float(attn.max()), (1, 2, 4), (1.0, 0.8, 0.55))
    fast = agq_errors([(attn, v), (attn[:1], v[:1])], t, s, bit=4, p=2.4)
    for k in range(t.numel()):
        ref = sum(float((agq_quantize(a, s[k], t[k], 16) @ vv - a @ vv).abs().pow(2.4).sum())
                  for a, vv in ((attn, v), (attn[:1], v[:1])))
        assert float(fast[k]) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("bit,sym", list(itertools.product([2, 4, 8], [False, True])))
def test_quantized_values_are_on_the_grid(bit, sym):
    x = torch.randn(500) * 3
    q = FixedFakeQuantize(MinMaxObserver(bit, sym), bit=bit, symmetric=sym)
    q.observer(x)
    q.init_from_observer()
    q.fake_quant_enabled = True
    with torch.no_grad():
        levels = torch.unique(q(x) / q.scale + q.zero_point)
    assert len(levels) <= 2 ** bit
    assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_mse_observer_histogram_path_agrees_with_exact_search():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(200000), torch.tensor([25.0, -18.0])])
    exact = MSEObserver(bit=4, max_samples=1 << 30, search="shrink")
    fast = MSEObserver(bit=4, max_samples=1 << 12, search="shrink")  # histogram path
    exact(x)
    fast(x)
    assert fast.max_val.item() == pytest.approx(exact.max_val.item(), rel=0.03)
    assert fast.min_val.item() == pytest.approx(exact.min_val.item(), rel=0.03)
    assert exact.max_val.item() < 10  # outliers clipped


def test_per_tensor_view_of_a_channels_last_tensor_is_not_a_copy():
    from ptq4sam.quantization.observer import channel_view, data_range

    x = torch.randn(2, 16, 16, 24).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
    assert channel_view(x, -1).data_ptr() == x.data_ptr()
    lo, hi = data_range(x, 1)
    assert torch.equal(lo, x.transpose(0, 1).reshape(24, -1).amin(1)) and torch.equal(hi, x.amax(dim=(0, 2, 3)))


def test_mse_observer_per_channel_histograms_agree_with_exact_search():
    """Per-channel activations (depthwise-conv inputs) go through one histogram per channel; the chosen ranges equal
    the exact search on all samples within the per-tensor histogram test's tolerance (one candidate step here)."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 64, 64) * torch.linspace(0.05, 4, 12)[None, :, None, None] + torch.linspace(-1, 2, 12)[
        None, :, None, None]
    x = torch.nn.functional.gelu(x)
    x[0, 3, 5, 5], x[1, 7, 0, 0] = 40.0, -9.0  # outliers
    for bit in (4, 6, 8):
        exact = MSEObserver(bit=bit, ch_axis=1, max_samples=1 << 30, search="shrink")
        fast = MSEObserver(bit=bit, ch_axis=1, search="shrink")  # 8192 samples per channel: histograms
        exact(x)
        fast(x)
        assert torch.allclose(fast.max_val, exact.max_val, rtol=0.03, atol=1e-6)
        assert torch.allclose(fast.min_val, exact.min_val, rtol=0.03, atol=1e-6)
    w = MSEObserver(bit=8, ch_axis=1, exact=True, search="shrink")  # weights (observed once): the exact search
    w(x)
    assert torch.equal(w.max_val, exact.max_val) and torch.equal(w.min_val, exact.min_val)



def test_frozen_evaluation_path_is_bit_identical_and_invalidated_by_state_switches():
    from torch import nn

    from ptq4sam.quantization import QuantizerConfig, QuantLinear, enable_quantization, freeze, set_drop_prob
    from ptq4sam.quantization.logq import agq_reference

    torch.manual_seed(3)
    w_cfg = QuantizerConfig(quantizer="AdaRoundFakeQuantize", observer="MSEObserver", bit=4, ch_axis=0)
    a_cfg = QuantizerConfig(quantizer="LSQFakeQuantize", observer="MinMaxObserver", bit=4)
    lin = QuantLinear.from_float(nn.Linear(16, 8), w_cfg, a_cfg)
    x = torch.randn(32, 16)
    lin.calibrate_weight()
    lin.input_quant.quantizer.observer(x)
    lin.input_quant.quantizer.init_from_observer()
    enable_quantization(lin)
    with torch.no_grad():
        lin.weight_quantizer.alpha.add_(torch.randn_like(lin.weight_quantizer.alpha))
        lin.weight_quantizer.harden()
        lin.input_quant.quantizer.scale.mul_(-1)  # LSQ uses |scale|: the frozen constants must too
        ref = lin(x)
        freeze(lin)
        assert "_frozen_weight" in lin.__dict__ and lin.input_quant.quantizer._frozen is not None
        assert torch.equal(lin(x), ref)
        lin.weight.mul_(2)  # an in-place weight change drops the cached quantized weight
        changed = lin(x)
        assert not torch.equal(changed, ref)
        set_drop_prob(lin, 1.0)  # any state switch unfreezes
        assert "_frozen_weight" not in lin.__dict__ and lin.input_quant.quantizer._frozen is None
        assert torch.equal(lin(x), changed)
    # AGQ: the in-place evaluation formula gives the same bits as the autograd one
    attn = torch.softmax(torch.randn(4, 64, 64) * 3, dim=-1)
    for tau, bit in itertools.product((1, 2, 4), (3, 4, 6, 8)):
        q = AGQFakeQuantize(MinMaxObserver(bit), bit=bit, tau=tau)
        q.set_qparams(torch.tensor([0.7]), torch.zeros(1))
        q.initialized = q.fake_quant_enabled = True
        with torch.enable_grad():
            slow = q(attn.clone().requires_grad_(True)).detach()
        with torch.no_grad():
            q.freeze()
            assert torch.equal(q(attn), slow), (tau, bit)
            assert torch.equal(agq_reference(attn, q.scale.detach(), tau, 2 ** bit), slow), (tau, bit)  # --compile's graph


def test_perturbed_outputs_is_seeded_exact_and_removed_on_exit():
    from torch import nn

    from ptq4sam.quantization import QuantizerConfig, QuantLinear, enable_quantization, perturbed_outputs

    torch.manual_seed(4)
    w_cfg = QuantizerConfig(quantizer="FixedFakeQuantize", observer="MinMaxObserver", bit=4, ch_axis=0)
    lin = QuantLinear.from_float(nn.Linear(16, 8), w_cfg, None)
    lin.calibrate_weight()
    enable_quantization(lin)
    model = nn.Sequential(lin, nn.ReLU())
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = model(x)
        with perturbed_outputs(model, 0.0) as n:
            assert n == 1 and torch.equal(model(x), ref)
        with perturbed_outputs(model, 1e-3, seed=7):
            noisy = model(x)
        expect = torch.relu(lin(x) * torch.randn(5, 8, generator=torch.Generator().manual_seed(7)).mul_(1e-3).add_(1))
        assert torch.equal(noisy, expect) and not torch.equal(noisy, ref)
        assert torch.equal(model(x), ref)  # hooks gone
        with pytest.raises(ValueError, match="rel must be >= 0"), perturbed_outputs(model, -1.0):
            pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_calibration_refuses_exactly_the_non_finite_inputs(bad):
    """The observer-side check (one min / max reduction) flags a single NaN / +Inf / -Inf anywhere, and nothing else
    (finite extremes and an empty tensor pass)."""
    from ptq4sam.errors import NonFiniteActivation

    q = FixedFakeQuantize(MinMaxObserver(8, False, -1), bit=8)
    q.observer_enabled, q.fake_quant_enabled = True, False
    x = torch.randn(3, 5, 7)
    x[0, 0, 0], x[2, 4, 6] = torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max
    if bad is None:
        q(x)
        q(torch.empty(0, 4))
        return
    x[1, 2, 3] = bad
    with pytest.raises(NonFiniteActivation, match="1 of 105 activations .* NaN/Inf"):
        q(x)
