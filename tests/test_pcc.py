"""SAQ-SAM's Perceptual-Consistency Clipping: the focus-IoU metric on hand values, the quantile clips against numpy,
the search's tie rule, and PCC on LiteMedSAM's decoder (each clip is the quantile of what its quantizer saw; the
reported score is the attention's focus loss recomputed independently)."""
import copy

import numpy as np
import pytest
import torch
from conftest import calib_samples

from ptq4sam.pcc import focus_loss, focus_mask, quantile_clips, search_point
from ptq4sam.qconfig import QConfigError, load_qconfig


def test_focus_iou_on_hand_values():
    """theta 0.5: row [.6 .3 .1] focuses on .6 only (.3 is not > .3); [.4 .35 .25] on all three: IoU 1/3 per row pair,
    counted over the whole map: 2 / 6."""
    fp = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.4, 0.35, 0.25], [0.3, 0.3, 0.4]])
    assert focus_mask(fp, 0.5).tolist() == [[True, False, False], [False, False, True]]
    assert focus_loss(q[None, None], fp[None, None]) == pytest.approx(1 - 2 / 6, abs=1e-6)
    # averaged over maps (boxes x heads): an identical second head scores 0
    two = focus_loss(torch.stack([q, fp])[None], torch.stack([fp, fp])[None])
    assert two == pytest.approx((1 - 2 / 6) / 2, abs=1e-6)
    assert focus_loss(fp, fp, theta=0.9) == pytest.approx(0.0, abs=1e-6)


def test_quantile_clips_are_numpys_quantiles_of_all_values():
    xs = [torch.arange(0, 50, dtype=torch.float32), torch.arange(50, 101, dtype=torch.float32)]
    got = quantile_clips(xs, [0.9, 0.99])  # 101 values 0..100: the p quantile is 100 p
    assert np.allclose(got, [(10.0, 90.0), (1.0, 99.0)], rtol=0, atol=1e-9)


def test_search_keeps_the_first_of_equal_scores_and_leaves_the_best_clip_set():
    seen = []

    def set_clip(q, lo, hi):
        seen.append((lo, hi))
        q["clip"] = (lo, hi)

    q = {}
    xs = [torch.linspace(-1, 1, 201)]
    scores = iter([0.5, 0.2, 0.2, 0.3])
    rep = search_point(q, xs, lambda: next(scores), [0.9, 0.95, 0.99, 0.999], set_clip)
    assert rep["quantile"] == 0.95 and rep["score"] == 0.2 and rep["score_widest"] == 0.3
    assert q["clip"] == seen[1] == pytest.approx((-0.9, 0.9))


@pytest.fixture(scope="module")
def lite():
    from ptq4sam.models import build_sam

    return build_sam("lite_medsam")


def test_pcc_on_lite_medsam_decoder(lite):
    from ptq4sam.models import BoxPromptSegmenter
    from ptq4sam.ptq import quantize_segmenter
    from ptq4sam.quant_sam import QuantDecoderAttention, quant_attentions
    from ptq4sam.quantization import disable_all
    from ptq4sam.samples import CalibSample, forward_sample

    s = calib_samples(1)[0]
    sample = CalibSample(s.image, s.boxes[:3])
    sam = copy.deepcopy(lite)
    seg = BoxPromptSegmenter(sam)
    grid = [0.9, 0.99, 0.999, 0.99999]
    q = load_qconfig("exp/demo/config66.yaml", ["recon.iters=0", "a_qconfig.bit=4", "ptq4sam.BIG=false",
                                                "w_qconfig.observer=MinMaxObserver",
                                                "ptq4sam.AGQ=false", "saqsam.PCC=true", f"saqsam.pcc_quantiles={grid}"])
    info = quantize_segmenter(seg, [sample], q, quant_encoder=False, device=torch.device("cpu"), log=lambda *a: None)
    rep = info.methods["pcc"]
    atts = [a for a in quant_attentions(sam.mask_decoder) if isinstance(a, QuantDecoderAttention)]
    assert len(rep) == 4 * len(atts) == 28 and all(e["quantile"] in grid for e in rep)
    # the first attention (layer 0's self-attention) sees float inputs: its q_proj input clip is the quantile of
    # the float queries, and with its 4 clips on the focus loss is the last reported score
    a = atts[0]
    disable_all(sam)
    got = {}
    h = a.register_forward_pre_hook(lambda m, args, kw: got.update(q=kw["q"], k=kw["k"]), with_kwargs=True)
    with torch.no_grad():
        forward_sample(seg, sample)
        h.remove()
        e = rep[0]
        p = e["quantile"]
        want = np.quantile(got["q"].numpy().ravel(), [1 - p, p])
        assert e["layer"].endswith("q_in") and e["clip"] == pytest.approx(list(want), rel=1e-5)
        qin = a.q_proj.input_quant.quantizer
        assert float(qin.scale) == pytest.approx((max(want[1], 0) - min(want[0], 0)) / 15, rel=1e-5)

        def attn():
            qq = a.q_quant(a.q_proj(got["q"]))
            kk = a.k_quant(a.k_proj(got["k"]))
            heads = a.num_heads
            qq, kk = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (qq, kk))
            return torch.softmax(qq @ kk.transpose(-1, -2) / qq.shape[-1] ** 0.5, dim=-1)
        ref = attn()
        for x in (qin, a.k_proj.input_quant.quantizer, a.q_quant.quantizer, a.k_quant.quantizer):
            x.fake_quant_enabled = True
        assert focus_loss(attn(), ref) == pytest.approx(rep[3]["score"], abs=1e-9)
        # greedy: the next attention's q_proj input clip is the quantile of what it sees with those 4 clips on
        b = atts[1]
        h = b.register_forward_pre_hook(lambda m, args, kw: got.update(q1=kw["q"]), with_kwargs=True)
        forward_sample(seg, sample)
        h.remove()
        e1 = rep[4]
        want1 = np.quantile(got["q1"].numpy().ravel(), [1 - e1["quantile"], e1["quantile"]])
        assert e1["layer"] == "layers.0.token_to_image.q_in" and e1["clip"] == pytest.approx(list(want1), rel=1e-5)
        disable_all(sam)  # (the float inputs differ from those: the check above is not vacuous)
        h = b.register_forward_pre_hook(lambda m, args, kw: got.update(q1_float=kw["q"]), with_kwargs=True)
        forward_sample(seg, sample)
        h.remove()
        assert not torch.equal(got["q1"], got["q1_float"])


def test_pcc_skips_quantizers_it_cannot_clip_and_config_errors_name_the_key(lite):
    from ptq4sam.models import BoxPromptSegmenter
    from ptq4sam.ptq import quantize_segmenter
    from ptq4sam.samples import CalibSample

    s = calib_samples(1)[0]
    q = load_qconfig("exp/demo/config66.yaml", ["recon.iters=0", "ptq4sam.BIG=false", "ptq4sam.AGQ=false",
                                                "w_qconfig.observer=MinMaxObserver", "saqsam.PCC=true",
                                                "saqsam.pcc_quantiles=[0.99]", "ahcptq.CAG=true"])
    info = quantize_segmenter(BoxPromptSegmenter(copy.deepcopy(lite)), [CalibSample(s.image, s.boxes[:2])], q,
                              quant_encoder=False, device=torch.device("cpu"), log=lambda *a: None)
    rep = info.methods["pcc"]
    assert {e["skipped"] for e in rep if e["layer"].endswith("_in")} == {"CAGFakeQuantize"}
    assert all("quantile" in e for e in rep if e["layer"].endswith("_post"))
    for opt, key in (("saqsam.pcc_quantiles=[0.4]", "saqsam.pcc_quantiles"), ("saqsam.pcc_theta=1", "saqsam.pcc_theta"),
                     ("saqsam.pcc_images=0", "saqsam.pcc_images")):
        with pytest.raises(QConfigError, match=key):
            load_qconfig("exp/demo/config66.yaml", [opt])
