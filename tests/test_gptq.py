"""GPTQ weights (ptq4sam/gptq.py) against a written-out reference of the GPTQ / OBS update."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from ptq4sam.gptq import _grid, apply_gptq, gptq_quantize
from ptq4sam.qconfig import QConfigError, load_qconfig
from ptq4sam.quantization import QuantizerConfig
from ptq4sam.quantization.qmodules import QuantConv2d, QuantLinear
from ptq4sam.quantization.state import disable_all, enable_calibration, enable_quantization, harden_all


def _reference(w, h, scale, zp, qmin, qmax, damp, order):
    """GPTQ as the OBS update with an explicit inverse Hessian (GPTQ paper, eq. 2-3), columns in ``order``:
    quantize a column, spread its error over the remaining columns with H^-1, remove it from H^-1."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    d = np.diag(h).copy()
    d[d == 0] = 1.0
    h[np.diag_indices_from(h)] = d
    h += damp * d.mean() * np.eye(len(d))
    hinv = np.linalg.inv(h)
    q = np.zeros_like(w)
    left = list(order)
    for i in order:
        q[:, i] = (np.clip(np.round(w[:, i] / scale) + zp, qmin, qmax) - zp) * scale
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        left.remove(i)
        w[:, left] -= np.outer(err, hinv[i, left])
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q


def _data(seed, rows=6, cols=12, n=300):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, cols)) @ g.normal(size=(cols, cols))
    x[:, 3] = 0.0  # an input that is always 0: a dead column
    w = g.normal(size=(rows, cols))
    scale = np.abs(w).max(1) / 7
    zp = g.integers(-1, 2, size=rows).astype(np.float64)
    return x, w, 2 * x.T @ x / n, scale, zp


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_the_obs_reference(act_order):
    x, w, h, scale, zp = _data(0)
    got = gptq_quantize(torch.tensor(w)[None], torch.tensor(h)[None], torch.tensor(scale)[None], torch.tensor(zp)[None],
                        -8, 7, damp=0.01, act_order=act_order)[0].numpy()
    dh = np.diag(h).copy()
    dh[dh == 0] = 1.0
    order = np.argsort(-dh, kind="stable") if act_order else np.arange(len(dh))
    ref = _reference(w, h, scale, zp, -8, 7, 0.01, order)
    np.testing.assert_array_equal(got, ref)
    on_grid = (got / scale[:, None] + zp[:, None])
    np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-9)
    assert on_grid.min() >= -8 - 1e-9 and on_grid.max() <= 7 + 1e-9

    def out_err(q):
        return float(((w - q) @ x.T).__pow__(2).sum())
    rtn = (np.clip(np.round(w / scale[:, None]) + zp[:, None], -8, 7) - zp[:, None]) * scale[:, None]
    assert out_err(got) < 0.8 * out_err(rtn)  # 956 vs 1283 (act_order=False)


def test_gptq_with_identity_hessian_is_round_to_nearest_and_groups_are_independent():
    _, w, h, scale, zp = _data(1)
    wt, st, zt = torch.tensor(w)[None], torch.tensor(scale)[None], torch.tensor(zp)[None]
    rtn = _grid(wt, st[..., None], zt[..., None], -8, 7)
    assert torch.equal(gptq_quantize(wt, torch.eye(w.shape[1])[None], st, zt, -8, 7), rtn)
    _, w2, h2, s2, z2 = _data(2)
    both = gptq_quantize(torch.tensor(np.stack([w, w2])), torch.tensor(np.stack([h, h2])),
                         torch.tensor(np.stack([scale, s2])), torch.tensor(np.stack([zp, z2])), -8, 7)
    for k, (a, b, c, d) in enumerate(((w, h, scale, zp), (w2, h2, s2, z2))):
        one = gptq_quantize(torch.tensor(a)[None], torch.tensor(b)[None], torch.tensor(c)[None], torch.tensor(d)[None],
                            -8, 7)
        assert torch.equal(both[k], one[0])


def test_apply_gptq_uses_each_layers_float_inputs():
    """Hooks collect 2 X^T X / n of each layer's float input (a Linear's rows, a convolution's unfolded patches per
    group); each weight becomes gptq_quantize of it on its quantizer's grid, which the quantizer then reproduces."""
    torch.manual_seed(0)
    w_cfg = QuantizerConfig("AdaRoundFakeQuantize", "MSEObserver", 4, False, 0)
    a_cfg = QuantizerConfig("LSQFakeQuantize", "AvgMSEObserver", 4, False, -1)
    model = nn.Sequential(
        QuantConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), w_cfg, a_cfg),
        QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1, groups=8), w_cfg, a_cfg),
        nn.Flatten(2), QuantLinear.from_float(nn.Linear(25, 6), w_cfg, a_cfg))
    for m in model:
        if hasattr(m, "calibrate_weight"):
            m.calibrate_weight()
    disable_all(model)
    xs = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    before = [m.weight.detach().clone() for m in (model[0], model[1], model[3])]
    inputs = {0: [], 1: [], 3: []}
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach())) for i in inputs]
    with torch.no_grad():
        for x in xs:
            model(x)
    for hd in hooks:
        hd.remove()
    info = apply_gptq(model, lambda: [model(x) for x in xs])
    assert info["layers"] == 3 and not info["skipped"] and info["not_supported"] == []
    for k, (i, w0) in enumerate(zip((0, 1, 3), before)):
        m = model[i]
        x = torch.cat(inputs[i])
        if i == 3:
            cols = x.reshape(1, -1, 25)
        else:
            u = torch.nn.functional.unfold(x, 3, padding=1)  # (B, C * 9, L)
            g = m.groups
            cols = u.reshape(u.shape[0], g, -1, u.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, u.shape[1] // g)
        h = 2 * torch.einsum("gni,gnj->gij", cols.double(), cols.double()) / cols.shape[1]
        g = h.shape[0]
        sc, zp = m.weight_quantizer.scale.reshape(g, -1), m.weight_quantizer.zero_point.reshape(g, -1)
        wq = m.weight_quantizer
        ref = gptq_quantize(w0.reshape(g, w0.shape[0] // g, -1), h, sc, zp, wq.quant_min, wq.quant_max)
        ref = ref.reshape(w0.shape).float()
        torch.testing.assert_close(m.quant_source(), ref, rtol=0, atol=1e-6)
        assert torch.equal(m.weight, w0)  # the float weight is kept
        assert info["per_layer"][k]["proxy_gptq"] <= info["per_layer"][k]["proxy_rtn"]
        m.weight_quantizer.fake_quant_enabled = True
        m.weight_quantizer.harden()
        torch.testing.assert_close(m.qweight(), ref, rtol=0, atol=1e-6)  # the quantizer reproduces GPTQ's weight
        m.weight_quantizer.fake_quant_enabled = False


def test_after_gptq_every_quantizer_off_is_the_float_model_exactly():
    """GPTQ must not overwrite the float weights: reconstruction targets and the AGQ search are float forwards."""
    torch.manual_seed(1)
    w_cfg = QuantizerConfig("AdaRoundFakeQuantize", "MSEObserver", 4, False, 0)
    a_cfg = QuantizerConfig("LSQFakeQuantize", "AvgMSEObserver", 4, False, -1)
    float_model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(2), nn.Linear(25, 6))
    model = nn.Sequential(QuantConv2d.from_float(copy.deepcopy(float_model[0]), w_cfg, a_cfg), nn.Flatten(2),
                          QuantLinear.from_float(copy.deepcopy(float_model[2]), w_cfg, a_cfg))
    for m in (model[0], model[2]):
        m.calibrate_weight()
    xs = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    enable_calibration(model)
    with torch.no_grad():
        for x in xs:
            model(x)
    for m in (model[0], model[2]):
        m.input_quant.quantizer.init_from_observer()
    enable_quantization(model, weights=False)
    info = apply_gptq(model, lambda: [model(x) for x in xs])
    assert info["layers"] == 2
    disable_all(model)
    with torch.no_grad():
        for x in xs:
            assert torch.equal(model(x), float_model(x))
        enable_quantization(model)  # and the quantized model uses GPTQ's weights, not round-to-nearest of the float
        harden_all(model)
        w_rtn = model[2].weight_quantizer(model[2].weight)
        assert not torch.equal(model[2].qweight(), w_rtn)


def test_gptq_yaml_switch(tmp_path):
    q = load_qconfig("exp/demo/config44.yaml", ["gptq.enabled=true"])
    assert q.gptq.enabled and q.gptq.damp == 0.1 and q.gptq.act_order and q.gptq.inputs == "quantized"
    with pytest.raises(QConfigError, match="gptq.damp"):
        load_qconfig("exp/demo/config44.yaml", ["gptq.damp=0"])
    with pytest.raises(QConfigError, match="gptq.inputs"):
        load_qconfig("exp/demo/config44.yaml", ["gptq.inputs=fp"])


def test_gptq_dampening_default_is_one_value():
    import inspect

    from ptq4sam.gptq import DEFAULT_DAMP
    from ptq4sam.methods.gptq import GPTQSection

    for fn in (apply_gptq, gptq_quantize):
        assert inspect.signature(fn).parameters["damp"].default == DEFAULT_DAMP == GPTQSection().damp
