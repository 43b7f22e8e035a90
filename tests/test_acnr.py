"""ACNR (AHCQ-SAM's activation-aware condition-number reduction): the proximal step against values written out by
hand, what it keeps and what it changes on a random weight, the activation-error energies, and the method on a
quantized SAM against an independent recomputation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ptq4sam.acnr import LayerSVD, acnr_values, condition_number, tail_index
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import QConfigError, load_qconfig
from ptq4sam.quantization.observer import qparams_from_range

CPU = torch.device("cpu")


def test_one_step_by_hand():
    """s = (10, 3, 1, 0.1): energies 100, 109, 110, 110.01; 0.8 of the total (88.008) is first exceeded at the
    first value, so (3, 1, 0.1) is the tail; t = 3.525; s_hat = (s + 2 lam t) / (1 + 2 lam + 2 beta C)."""
    s, c = torch.tensor([10.0, 3.0, 1.0, 0.1], dtype=torch.float64), torch.tensor([0.0, 50.0, 0.0, 4.0])
    lam, beta, t = 0.003, 0.001, 3.525
    hat = [(3.0 + 2 * lam * t) / (1 + 2 * lam + 2 * beta * 50.0), (1.0 + 2 * lam * t) / (1 + 2 * lam),
           (0.1 + 2 * lam * t) / (1 + 2 * lam + 2 * beta * 4.0)]
    want = [10.0, max(3.0, hat[0]), max(1.0, hat[1]), max(0.1, hat[2])]
    got = acnr_values(s, c, 1, lam, beta, 0.8)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-15)
    assert want[1] == 3.0 and want[2] > 1.0 and want[3] > 0.1  # 3 > its s_hat: only raised, never lowered
    assert tail_index(s, 0.8).tolist() == [1, 2, 3]
    # unsorted values: the same tail by value, not by position
    assert sorted(tail_index(torch.tensor([1.0, 10.0, 0.1, 3.0]), 0.8).tolist()) == [0, 2, 3]


def test_tail_is_recomputed_each_step():
    """The tail is chosen on the current values: raised tail energy moves the cut, and a value that left the tail
    stays as it is (a written-out loop gives the same values)."""
    s0 = torch.tensor([4.0, 2.0, 1.5, 1.0, 0.01, 0.01])
    c = torch.zeros(6)
    got = acnr_values(s0, c, 300, lam=0.05, beta=0.0, energy=0.6)
    ref = s0.double().tolist()
    for _ in range(300):
        order = sorted(range(6), key=lambda i: -ref[i])
        tot, acc, cut = sum(x * x for x in ref), 0.0, None
        for j, i in enumerate(order):
            acc += ref[i] ** 2
            if acc > 0.6 * tot:
                cut = j
                break
        t = sum(ref) / 6
        for i in order[cut + 1:]:
            ref[i] = max(ref[i], (ref[i] + 0.1 * t) / 1.1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    assert got[0] == 4.0


def test_lowers_kappa_keeps_the_head_and_the_singular_vectors():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 48, dtype=torch.float64))
    s = torch.logspace(1, -3, 48, dtype=torch.float64)  # kappa 1e4
    w = (u * s) @ v.T  # (48 out, 64 in)
    svd = LayerSVD.of(w)
    svd.add(torch.randn(500, 64, dtype=torch.float64) * 0.1)
    w_new, s_new = svd.reduced(200)
    s_check = torch.linalg.svdvals(w_new)
    np.testing.assert_allclose(s_check.numpy(), torch.sort(s_new, descending=True).values.numpy(), rtol=1e-9)
    assert condition_number(s_new) < condition_number(svd.s) / 10
    head = [i for i in range(48) if i not in tail_index(svd.s, 0.8).tolist()]
    assert head and torch.equal(s_new[head], svd.s[head])  # high-energy values untouched
    assert bool((s_new >= svd.s).all())
    # the same singular vectors: W'^T = U diag(s') V^T with the original U, V
    np.testing.assert_allclose(((svd.u * s_new) @ svd.vh).T.numpy(), w_new.numpy(), rtol=0, atol=1e-12)


def test_activation_error_along_a_direction_holds_its_value_back():
    """C_i = mean over tokens of (delta_x . u_i)^2 (checked against a loop); a direction with a larger error is
    raised less than the same value with none."""
    torch.manual_seed(1)
    w = torch.randn(16, 24, dtype=torch.float64)
    svd = LayerSVD.of(w)
    xs = [torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(7, 24, dtype=torch.float64)]
    for x in xs:
        svd.add(x)
    rows = torch.cat([x.reshape(-1, 24) for x in xs])
    ref = torch.tensor([float(sum(float(r @ svd.u[:, i]) ** 2 for r in rows)) for i in range(svd.s.numel())],
                       dtype=torch.float64)
    assert svd.n == 22
    np.testing.assert_allclose((svd.c).numpy(), ref.numpy(), rtol=1e-10)
    s = torch.tensor([10.0, 1.0, 1.0])
    got = acnr_values(s, torch.tensor([0.0, 0.0, 2.0]), 50)
    assert got[1] > got[2] > 1.0


def _vit_b(seed=0):
    torch.manual_seed(seed)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:3]
    return sam


def test_acnr_on_a_quantized_sam_matches_an_independent_recomputation(tmp_path):
    """ahcqsam.ACNR on SAM's decoder (ViT-B, random weights, 64 px; float encoder: its kept embeddings): the layers
    with kappa >= 100 are treated and only those; each treated weight's quantizer rounds U diag(s') V^T where C
    comes from the layer's float input and its quantized input (captured here by hooks on the layer itself) and s'
    from acnr_values; a saved checkpoint and the --resume state carry ACNR's weights (a fresh model loaded from
    either gives the same outputs); the float model is unchanged (quantizers off = the original model)."""
    from ptq4sam.checkpoint import load_quantized_file, quant_state, restore_quant_state, save_quantized
    from ptq4sam.quant_sam import build_context, quantize_sam
    from ptq4sam.quantization import QuantLinear, disable_all, enable_quantization
    from ptq4sam.samples import CalibSample

    sam = _vit_b()
    fresh = copy.deepcopy(sam)
    seg = BoxPromptSegmenter(sam)
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    sample = CalibSample(img, np.array([[5, 5, 40, 30], [10, 0, 60, 47]], np.float32))
    q = load_qconfig("exp/demo/config44.yaml", ["recon.iters=0", "w_qconfig.observer=MinMaxObserver",
                                                "a_qconfig.observer=MinMaxObserver",
                                                "ptq4sam.AGQ=false", "ptq4sam.BIG=false", "ahcqsam.ACNR=true",
                                                "ahcqsam.acnr_iters=30"])
    info = quantize_segmenter(seg, [sample], q, quant_encoder=False, device=CPU, log=lambda *a: None)
    rep = info.methods["acnr"]
    layers = {n: m for n, m in sam.named_modules() if isinstance(m, QuantLinear)}
    kappas = {n: condition_number(torch.linalg.svdvals(fresh.get_submodule(n).weight.detach().double())) for n in layers}
    treated = {e["layer"] for e in rep["per_layer"]}
    assert treated == {n for n, k in kappas.items() if k >= 100} and 0 < len(treated) < len(layers)
    # saved and loaded, or restored from the resume state, into a fresh model: ACNR's weights, bit for bit
    with torch.no_grad():
        out = seg(img, sample.boxes).low_res_logits
    save_quantized(sam, tmp_path / "q.pth", q.to_dict(), False, info.to_dict())
    for how in ("load", "resume"):
        other = copy.deepcopy(fresh)
        if how == "load":  # as --load_sam_path does (the file holds the integer weights ACNR's weights became)
            load_quantized_file(other, tmp_path / "q.pth", CPU)
        else:  # the resume state holds ACNR's float weights themselves
            quantize_sam(other, build_context(q), False)
            restore_quant_state(other, quant_state(sam), "recon_state.pt")
            assert sum(n.endswith("gptq_weight") for n, _ in other.named_buffers()) == len(treated)
        with torch.no_grad():
            assert torch.equal(BoxPromptSegmenter(other)(img, sample.boxes).low_res_logits, out), how
    for n, m in layers.items():
        assert torch.equal(m.weight, fresh.get_submodule(n).weight)  # the float weights never change
        assert ("gptq_weight" in m._buffers) == (n in treated)
    # an independent recomputation for two treated layers, one in each two-way block
    for name in ["mask_decoder.transformer.layers.0.self_attn.q_proj",
                 "mask_decoder.transformer.layers.1.self_attn.v_proj"]:
        assert name in treated
        m = layers[name]
        got = {}

        def grab(mod, args, key=None):
            got.setdefault(key, []).append(args[0].detach().clone())
        disable_all(sam)
        h = m.register_forward_pre_hook(lambda mod, a: grab(mod, a, "fp"))
        seg(img, sample.boxes)
        h.remove()
        enable_quantization(sam, weights=False)
        h = m.register_forward_pre_hook(lambda mod, a: grab(mod, a, "q"))
        seg(img, sample.boxes)
        h.remove()
        with torch.no_grad():
            dx = torch.cat([(f - m.input_quant.quantizer(x)).reshape(-1, m.in_features)
                            for f, x in zip(got["fp"], got["q"])]).double()
        wt = fresh.get_submodule(name).weight.detach().double().T
        u, s, vh = np.linalg.svd(wt.numpy(), full_matrices=False)
        c = ((dx.numpy() @ u) ** 2).mean(0)
        s_new = acnr_values(torch.from_numpy(s), torch.from_numpy(c), 30).numpy()
        want = ((u * s_new) @ vh).T
        np.testing.assert_allclose(m.quant_source().double().numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())
        e = next(r for r in rep["per_layer"] if r["layer"] == name)
        assert e["kappa_after"] < e["kappa_before"]
    # the quantizer's grid was observed on ACNR's weight (its per-channel min / max), not on the float weight
    m = layers[sorted(treated)[0]]
    src, w, wq = m.quant_source(), m.weight, m.weight_quantizer
    scale, _ = qparams_from_range(src.amin(1), src.amax(1), 4, False)
    scale_float, _ = qparams_from_range(w.amin(1), w.amax(1), 4, False)
    torch.testing.assert_close(wq.scale.reshape(-1), scale.reshape(-1))
    assert not torch.allclose(scale, scale_float)
    disable_all(sam)
    disable_all(fresh)
    assert torch.equal(seg(img, sample.boxes).low_res_logits, BoxPromptSegmenter(fresh)(img, sample.boxes).low_res_logits)


def test_acnr_config_errors_name_the_key():
    for opt, msg in [("ahcqsam.acnr_iters=-1", "acnr_iters"), ("ahcqsam.acnr_energy=1.0", "acnr_energy"),
                     ("ahcqsam.acnr_beta=-1", "acnr_beta"), ("ahcqsam.acnr_kappa=0.5", "acnr_kappa")]:
        with pytest.raises(QConfigError, match=msg):
            load_qconfig("exp/demo/config66.yaml", [opt])
    with pytest.raises(QConfigError, match=r"ahcqsam.ACNR.*w_qconfig.bit"):
        load_qconfig("exp/demo/config66.yaml", ["ahcqsam.ACNR=true", "w_qconfig.bit=null"])


@pytest.mark.parametrize("float_calls, quant_calls, msg", [(1, 2, "more often with quantized"),
                                                            (2, 1, "more often in float")])
def test_collect_errors_refuses_unpaired_layer_calls(float_calls, quant_calls, msg):
    """A layer called a different number of times in the float and the quantized forward of a sample has no paired
    error to add: a clear error naming it, never a silently shifted pairing."""
    from torch import nn

    from ptq4sam.acnr import collect_errors
    from ptq4sam.samples import CalibSample

    layer = nn.Module()
    layer.input_quant = nn.Identity()
    sam = nn.Module()
    sam.layer = layer
    calls = iter([float_calls, quant_calls])

    class Seg:
        def __init__(self):
            self.sam = sam

        def decode(self, feats, boxes, size):
            for _ in range(next(calls)):
                layer.input_quant(torch.ones(2, 3))

    svd = LayerSVD.of(torch.randn(4, 3, dtype=torch.float64))
    sample = CalibSample(np.zeros((4, 4, 3), np.uint8), np.array([[0, 0, 2, 2]], np.float32))
    with pytest.raises(RuntimeError, match=f"ACNR: .*layer.*{msg}"):
        collect_errors(Seg(), [sample], [torch.zeros(1)], {"layer": layer}, {"layer": svd})
    assert not layer.input_quant._forward_hooks  # hooks removed
