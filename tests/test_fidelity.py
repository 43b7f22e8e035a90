"""Solver fidelity: each piece against a small reference written from the paper code's formula (chengtao-lv/PTQ4SAM)."""
import math

import numpy as np
import pytest
import torch

from ptq4sam.agq import PaperAGQSearch
from ptq4sam.big import bandwidth, big_sample, kde
from ptq4sam.quantization import LSQFakeQuantize, LSQPlusFakeQuantize, MinMaxObserver, MSEObserver
from ptq4sam.quantization.fake_quant import agq_quantize
from ptq4sam.quantization.observer import MSEFastObserver, fake_quant_ref, qparams_from_range
from ptq4sam.reconstruction import lp_loss, temperature


def test_lp_loss_paper_reduction_sums_dim1():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])  # (1, 3 tokens, 2 channels)
    tgt = torch.zeros_like(pred)
    # paper: (pred - tgt).abs().pow(2).sum(1).mean() = mean over channels of [1+9+0, 4+16+0] = 15
    assert lp_loss(pred, tgt, 2.0) == pytest.approx(15.0)
    assert lp_loss(pred, tgt, 2.0, reduction="mean") == pytest.approx(30.0 / 6)


def test_linear_temperature_is_the_papers_linear_temp_decay():
    iters, warm, (start, end) = 100, 0.2, (20.0, 2.0)

    def paper(t):  # LinearTempDecay.__call__ with the paper's 1-based counter
        if t < warm * iters:
            return start
        rel = (t - warm * iters) / (iters - warm * iters)
        return end + (start - end) * max(0.0, 1 - rel)

    for it in range(iters):
        b = temperature(it, iters, warm, (start, end), "linear")
        if it + 1 < warm * iters:  # the paper adds no rounding loss before the warm-up ends
            assert b is None
        else:
            assert b == pytest.approx(paper(it + 1))
    assert temperature(iters - 1, iters, warm, (start, end)) == pytest.approx(end)
    assert temperature(19, iters, warm, (start, end)) == pytest.approx(start)  # t = 20 = warm-up end
    assert temperature(59, iters, warm, (start, end)) == pytest.approx(2 + 18 * 0.5)  # half-way: the midpoint


def _brute_2d(x, bit, num=100, p=2.4):
    """The paper's MSEObserver.perform_2D_search: every range i, every zero point z, a candidate kept only when
    strictly better (the z loop vectorised: its first minimum is what the loop keeps)."""
    qmax = 2 ** bit - 1
    lo0, hi0 = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    best = torch.full((x.shape[0],), 1e10, dtype=torch.float64)
    bl, bh = lo0.clone(), hi0.clone()
    z = torch.arange(qmax + 1, dtype=x.dtype)[:, None]  # (Z, 1)
    ch = torch.arange(x.shape[0])
    for i in range(1, num + 1):
        d = (hi0 - lo0) / num * i / qmax
        nl, nh = -z * d, (qmax - z) * d  # (Z, C)
        s, zp = qparams_from_range(nl.reshape(-1), nh.reshape(-1), bit, False)
        xq = fake_quant_ref(x.repeat(qmax + 1, 1), s[:, None], zp[:, None], 0, qmax)
        e = (xq - x.repeat(qmax + 1, 1)).abs().pow(p).double().mean(1).reshape(qmax + 1, -1)
        k = e.argmin(0)
        ek = e[k, ch]
        bl, bh = torch.where(ek < best, nl[k, ch], bl), torch.where(ek < best, nh[k, ch], bh)
        best = torch.minimum(best, ek)
    return bl, bh, best


@pytest.mark.parametrize("bit", [3, 4, 8])  # 8: narrow ranges' minimisers far from the proportional zero point
def test_2d_weight_mse_search_equals_brute_force(bit):
    torch.manual_seed(bit)
    w = torch.randn(12, 48) * torch.rand(12, 1) + torch.randn(12, 1) * 0.7  # off-centre channels: z matters
    w[4, 5] = 6.0  # an outlier
    bl, bh, be = _brute_2d(w, bit)
    obs = MSEObserver(bit=bit, ch_axis=0, exact=True)  # search='paper'
    obs(w)
    s, zp = qparams_from_range(obs.min_val, obs.max_val, bit, False)
    e = (fake_quant_ref(w, s[:, None], zp[:, None], 0, 2 ** bit - 1) - w).abs().pow(2.4).double().mean(1)
    assert torch.allclose(e, be, rtol=1e-6)  # the optimum error, per channel
    assert torch.allclose(obs.min_val, bl, atol=1e-6) and torch.allclose(obs.max_val, bh, atol=1e-6)
    # the 1-D shrink search (an option) cannot move the zero point: it is worse on these channels
    old = MSEObserver(bit=bit, ch_axis=0, exact=True, search="shrink")
    old(w)
    s, zp = qparams_from_range(old.min_val, old.max_val, bit, False)
    e_old = (fake_quant_ref(w, s[:, None], zp[:, None], 0, 2 ** bit - 1) - w).abs().pow(2.4).double().mean(1)
    assert bool((e <= e_old * (1 + 1e-6)).all()) and float(e.sum()) < float(e_old.sum())


def test_2d_search_histogram_path_is_close_to_exact():
    torch.manual_seed(0)
    x = torch.randn(100000) * 0.8 + 0.9
    x[:3] = torch.tensor([12.0, -5.0, 8.0])
    exact = MSEObserver(bit=4, max_samples=1 << 30)
    fast = MSEObserver(bit=4)  # 2048-bin histogram
    exact(x)
    fast(x)

    def err(o):
        s, zp = qparams_from_range(o.min_val, o.max_val, 4, False)
        return float((fake_quant_ref(x, s, zp, 0, 15) - x).abs().pow(2.4).mean())
    assert err(fast) <= err(exact) * 1.02


def test_one_sided_data_takes_the_papers_1d_search():
    x = torch.rand(4, 64) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    obs = MSEObserver(bit=4, ch_axis=0, exact=True)
    obs(x)
    assert obs.one_side == "pos" and bool((obs.min_val == 0).all())


def test_mse_fast_observer_minimises_on_a_known_case():
    """The paper's bounded-scalar search: on uniform data with rare outliers the chosen 4-bit range clips the
    outliers and its error is within 1 % of a dense grid over (range, shift)."""
    torch.manual_seed(0)
    x = torch.cat([torch.rand(20000) * 2 - 0.5, torch.tensor([9.0, -6.0])])
    obs = MSEFastObserver(bit=4)
    obs(x)
    lo, hi = float(obs.min_val), float(obs.max_val)
    assert hi < 9 and lo > -6  # both outliers clipped

    def err(a, b):
        s, zp = qparams_from_range(torch.tensor([a]), torch.tensor([b]), 4, False)
        return float((fake_quant_ref(x, s, zp, 0, 15) - x).abs().pow(2.4).mean())
    grid = min(err(-sh, r - sh) for r in np.linspace(1.0, 4.0, 25) for sh in np.linspace(0, r, 25))
    assert err(lo, hi) <= grid * 1.01


def test_agq_paper_search_finds_the_generating_tau_and_scale():
    """Softmax values exactly on a 2^(-k/2) grid below s0: tau = 2 at s = s0 is error-free; tau = 4 drops the values
    with 2k >= 16 and tau = 1 cannot represent half steps. Two images: s = the mean of their optima."""
    torch.manual_seed(0)
    bit, search = 4, PaperAGQSearch(4, taus=(1, 2, 4))
    for s0 in (0.8, 0.6):
        k = torch.randint(0, 16, (2, 1, 6, 32)).float()
        attn = s0 * torch.exp2(-k / 2)
        attn[..., 0, 0] = s0
        v = torch.randn(2, 1, 32, 8)
        search.add(attn, v)
    res = search.result()
    assert res["tau"] == 2 and res["images"] == 2
    assert res["scale"] == pytest.approx(0.7, rel=1e-3)
    assert res["error_per_tau"][2] < 1e-8 < min(res["error_per_tau"][1], res["error_per_tau"][4])
    # per image, the found s reproduces the data exactly
    q = agq_quantize(attn, torch.tensor(0.6), 2, 2 ** bit)
    assert torch.allclose(q, attn, rtol=1e-5)


def test_kde_bandwidth_equals_scipy_gaussian_kde():
    from scipy.stats import gaussian_kde

    torch.manual_seed(0)
    x = torch.cat([torch.randn(3000) - 2, torch.randn(2000) * 0.5 + 2])
    ref = gaussian_kde(x.double().numpy())
    assert bandwidth(x) == pytest.approx(float(np.sqrt(ref.covariance[0, 0])), rel=1e-6)
    grid = torch.linspace(float(x.min()), float(x.max()), 128)
    assert np.allclose(kde(x, grid).numpy(), ref(grid.double().numpy()), rtol=1e-4, atol=1e-7)
    assert bandwidth(x, "silverman") == pytest.approx(1.06 * bandwidth(x), rel=1e-9)


def test_big_sample_first_prompt_and_pooled_without_aliasing():
    # token t of an image of 64 x 64 tokens has the value of its column x = t % 64 in every channel
    col = (torch.arange(4096) % 64).float()
    k_img = col[None, :, None].expand(64, 4096, 8).clone()  # 64 prompts
    test, signs = big_sample([k_img, k_img + 100], "first_prompt")
    assert test.shape == (4096, 8) and signs.shape == (64 * 4096, 8)  # first prompt tested, the image's signs
    test, signs = big_sample([k_img, k_img + 100], "pooled", max_samples=1 << 16)
    cols = torch.unique(test[test < 100]).long()
    assert cols.numel() == 64  # every image column appears (a stride of 64 rows would see only x = 0)


def test_lsq_per_channel_gradient_scale_divides_by_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    grads = {}
    for mode in ("paper", "numel"):
        q = LSQFakeQuantize(MinMaxObserver(4, False, 1), bit=4, ch_axis=1, grad_scale_mode=mode)
        q.set_qparams(torch.full((8,), 0.2), torch.full((8,), 7.0))
        q.initialized, q.fake_quant_enabled = True, True
        q(x).pow(2).sum().backward()
        grads[mode] = q.scale.grad.clone()
        assert q.grad_factor(x) == pytest.approx(1 / math.sqrt((x.numel() / (8 if mode == "paper" else 1)) * 15))
    assert torch.allclose(grads["paper"], grads["numel"] * math.sqrt(8), rtol=1e-5)


def test_lsq_plus_clamps_the_zero_point_in_training_and_evaluation_alike():
    q = LSQPlusFakeQuantize(MinMaxObserver(4, False, -1), bit=4)
    q.set_qparams(torch.tensor([0.1]), torch.tensor([19.0]))  # drifted above qmax = 15
    q.initialized, q.fake_quant_enabled = True, True
    x = torch.linspace(-2, 1, 50, requires_grad=True)
    train = q(x)
    with torch.no_grad():
        ev = q(x)
    assert torch.allclose(train.detach(), ev) and float(train.detach().min()) == pytest.approx(-1.5)  # zp clamped to 15
    train.sum().backward()
    assert q.zero_point.grad is not None


def test_weight_range_cache_returns_the_search_result(tmp_path, monkeypatch):
    from ptq4sam.quantization import weight_cache

    monkeypatch.setenv("PTQ4SAM_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    w = torch.randn(8, 32) + 0.3
    ref = MSEObserver(bit=4, ch_axis=0, exact=True)
    ref(w)
    first, second = MSEObserver(bit=4, ch_axis=0, exact=True), MSEObserver(bit=4, ch_axis=0, exact=True)
    weight_cache.observe_weight(first, w)
    files = list((tmp_path / "weight_ranges").glob("*.pt"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(MSEObserver, "batch_range", lambda *a: calls.append(1))  # a cache hit must not search
    weight_cache.observe_weight(second, w)
    assert not calls
    for o in (first, second):
        assert torch.equal(o.min_val, ref.min_val) and torch.equal(o.max_val, ref.max_val) and o.num_batches == 1
    other = MSEObserver(bit=3, ch_axis=0, exact=True)  # another bit width is another key
    monkeypatch.undo()
    monkeypatch.setenv("PTQ4SAM_CACHE_DIR", str(tmp_path))
    weight_cache.observe_weight(other, w)
    assert len(list((tmp_path / "weight_ranges").glob("*.pt"))) == 2
    files[0].write_bytes(b"damaged")  # a damaged file is recomputed
    again = MSEObserver(bit=4, ch_axis=0, exact=True)
    weight_cache.observe_weight(again, w)
    assert torch.equal(again.min_val, ref.min_val)


def test_weight_range_cache_key_follows_the_code_it_caches(tmp_path, monkeypatch):
    """The key hashes the observers' code: an edited search is a new key, never a stale hit from a warm cache."""
    import hashlib
    from pathlib import Path

    from ptq4sam.quantization import observer, weight_cache

    h = hashlib.sha1()
    for f in (Path(observer.__file__), Path(weight_cache.__file__)):
        h.update(f.read_bytes())
    assert weight_cache.VERSION == h.hexdigest()[:16]
    w = torch.randn(4, 8)
    obs = MSEObserver(bit=4, ch_axis=0, exact=True)
    key = weight_cache._key(obs, w)
    monkeypatch.setattr(weight_cache, "VERSION", "an-edited-search")
    assert weight_cache._key(obs, w) != key
