"""``attention.placement``: ``nncf`` (NNCF's transformer preset: q and k symmetric, softmax.v float) and ``float`` (no
quantizer inside the attention) -- in the fake-quant model (against an independent attention), in the q_config checks
and in the exported graph."""
import numpy as np
import onnx
import pytest
import torch

from ptq4sam.deploy.onnx_export import export_sam
from ptq4sam.deploy.runtime import open_graph
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import QConfigError, load_qconfig
from ptq4sam.quant_sam import QuantDecoderAttention, quant_attentions
from ptq4sam.samples import CalibSample

CPU = torch.device("cpu")


def test_nncf_placement_refuses_a_softmax_quantizer():
    with pytest.raises(QConfigError, match=r"attention.placement.*ptq4sam.AGQ"):
        load_qconfig("exp/demo/config88.yaml", ["attention.placement=nncf"])
    with pytest.raises(QConfigError, match=r"attention.placement.*ahcqsam.LNQ"):
        load_qconfig("exp/demo/config88.yaml", ["attention.placement=nncf", "ptq4sam.AGQ=false", "ahcqsam.LNQ=true"])
    with pytest.raises(QConfigError, match=r"attention.placement.*'nncf'.*turn ptq4sam.BIG off"):
        load_qconfig("exp/demo/config88.yaml", ["attention.placement=nncf", "ptq4sam.AGQ=false"])
    with pytest.raises(QConfigError, match=r"attention.placement.*'float'.*ptq4sam.AGQ"):
        load_qconfig("exp/demo/config88.yaml", ["attention.placement=float"])
    with pytest.raises(QConfigError, match=r"attention.placement.*'paper', 'nncf', 'float'"):
        load_qconfig("exp/demo/config88.yaml", ["attention.placement=fused"])


def _vit_b():
    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:3]
    return sam


def _options(placement, extra=()):
    return ["recon.iters=0", "w_qconfig.observer=MinMaxObserver", "a_qconfig.observer=MinMaxObserver",
            "ptq4sam.AGQ=false", "ptq4sam.BIG=false", f"attention.placement={placement}", *extra]


def _vit_b_w8a8(placement, extra=()):
    sam = _vit_b()
    seg = BoxPromptSegmenter(sam)
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    sample = CalibSample(img, np.array([[5, 5, 40, 30], [10, 0, 60, 47]], np.float32))
    q = load_qconfig("exp/demo/config88.yaml", _options(placement, extra))
    quantize_segmenter(seg, [sample], q, quant_encoder=True, device=CPU, log=lambda *a: None)
    return seg, sample, q


def test_nncf_placement_in_torch_and_in_the_exported_graph(tmp_path):
    """Every attention (3 ViT blocks, 7 decoder attentions): no quantizer on the softmax output and on v; q and k
    symmetric (zero point 0, a signed grid). A decoder attention's output equals an independent computation (per-tensor
    symmetric fake quantization of the projected q and k by torch's own kernel, scaled_dot_product_attention with a
    float v). In the exported graphs each Softmax feeds its MatMul directly, v comes from no DequantizeLinear, and
    ONNX Runtime reproduces the masks. The paper's placement of the same model keeps all four."""
    seg, sample, q = _vit_b_w8a8("nncf")
    atts = quant_attentions(seg.sam)
    assert len(atts) == 3 + 7
    for a in atts:
        assert a.attn_quant.quantizer is None and a.v_quant.quantizer is None
        for p in (a.q_quant.quantizer, a.k_quant.quantizer):
            assert p.symmetric and p.quant_min == -128 and p.quant_max == 127 and float(p.zero_point.abs().max()) == 0
    att = next(a for a in atts if isinstance(a, QuantDecoderAttention))
    g = torch.Generator().manual_seed(3)
    x_q, x_k, x_v = (torch.randn(2, 5 if i == 0 else 16, att.embedding_dim, generator=g) for i in range(3))
    with torch.no_grad():
        got = att(x_q, x_k, x_v)

        def fq(t, quant):
            s = float(quant.quantizer.scale)
            return torch.fake_quantize_per_tensor_affine(t, s, 0, -128, 127)

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], att.num_heads, -1).transpose(1, 2)

        qh, kh = heads(fq(att.q_proj(x_q), att.q_quant)), heads(fq(att.k_proj(x_k), att.k_quant))
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, heads(att.v_proj(x_v)))
        want = att.out_proj(o.transpose(1, 2).reshape(2, 5, -1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    man = export_sam(seg.sam, tmp_path, 64, q.to_dict(), True).manifest
    assert "emulated-agq" not in man["quantizers"]
    for part in ("encoder", "decoder"):
        graph = onnx.load(tmp_path / f"{part}.onnx").graph
        made_by = {o: n for n in graph.node for o in n.output}
        softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
        assert len(softmaxes) == (3 if part == "encoder" else 7)
        for sm in softmaxes:
            users = [n for n in graph.node if sm.output[0] in n.input]
            assert [u.op_type for u in users] == ["MatMul"], part
            other = [i for i in users[0].input if i != sm.output[0]][0]
            assert made_by[other].op_type != "DequantizeLinear", part
    x = seg.prepare_image(sample.image)
    with torch.no_grad():
        feats = seg.sam.image_encoder(x)
        low, _ = seg.decode(feats, torch.as_tensor(sample.boxes), sample.image.shape[:2])
    boxes = seg.transform.apply_boxes_torch(torch.as_tensor(sample.boxes), sample.image.shape[:2])
    m_dec, _ = open_graph(tmp_path / "decoder.onnx", "ort")({"image_embeddings": feats.numpy(), "boxes": boxes.numpy()})
    assert ((m_dec > 0) == (low.numpy() > 0)).mean() >= 0.99

    paper, _, _ = _vit_b_w8a8("paper")
    for a in quant_attentions(paper.sam):
        assert all(p.quantizer is not None for p in (a.q_quant, a.k_quant, a.v_quant, a.attn_quant))
        assert not a.q_quant.quantizer.symmetric


def test_float_placement_leaves_the_attention_matmuls_float():
    """No quantizer on q, k, v or the softmax output; the projections stay quantized; a decoder attention's output
    equals scaled_dot_product_attention of its (quantized) projections' outputs."""
    seg, _, _ = _vit_b_w8a8("float")
    atts = quant_attentions(seg.sam)
    assert len(atts) == 10
    for a in atts:
        assert all(p.quantizer is None for p in (a.q_quant, a.k_quant, a.v_quant, a.attn_quant))
    att = next(a for a in atts if isinstance(a, QuantDecoderAttention))
    assert att.q_proj.weight_quantizer.fake_quant_enabled and att.q_proj.input_quant.quantizer is not None
    g = torch.Generator().manual_seed(4)
    x_q, x_k, x_v = (torch.randn(2, 5 if i == 0 else 16, att.embedding_dim, generator=g) for i in range(3))
    with torch.no_grad():
        got = att(x_q, x_k, x_v)

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], att.num_heads, -1).transpose(1, 2)

        o = torch.nn.functional.scaled_dot_product_attention(heads(att.q_proj(x_q)), heads(att.k_proj(x_k)),
                                                             heads(att.v_proj(x_v)))
        want = att.out_proj(o.transpose(1, 2).reshape(2, 5, -1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_nncf_placement_reconstructs_saves_and_loads(tmp_path):
    """With reconstruction (2 steps per unit) and LSQ+ activation quantizers, the symmetric q / k keep zero point 0
    (LSQ+ learns no offset on a symmetric grid); the saved model loads into a fresh conversion with identical outputs,
    and a q_config with another placement is refused naming the key."""
    import copy

    from ptq4sam.checkpoint import load_quantized, save_quantized
    from ptq4sam.models.sam_builder import CheckpointError
    from ptq4sam.quant_sam import build_context, quantize_sam

    extra = ["recon.iters=2", "recon.drop_prob=1.0", "recon.scale_lr=0.01", "a_qconfig.quantizer=LSQPlusFakeQuantize"]
    seg, sample, q = _vit_b_w8a8("nncf", extra)
    for a in quant_attentions(seg.sam):
        for p in (a.q_quant.quantizer, a.k_quant.quantizer):
            assert p.symmetric and float(p.zero_point.detach().abs().max()) == 0
    ref = seg(sample.image, sample.boxes).low_res_logits
    save_quantized(seg.sam, tmp_path / "q.pth", q.to_dict(), True)
    fresh = _vit_b()
    for t in fresh.parameters():
        t.requires_grad_(False)
    quantize_sam(fresh, build_context(q), True, float_modules=tuple(q.float_modules))
    other = load_qconfig("exp/demo/config88.yaml", _options("float", extra))
    with pytest.raises(CheckpointError, match=r"another quantization setting \(attention.placement: 'nncf' -> 'float'; "):
        load_quantized(copy.deepcopy(fresh), tmp_path / "q.pth", CPU, other, True)
    load_quantized(fresh, tmp_path / "q.pth", CPU, q, True)
    assert torch.equal(BoxPromptSegmenter(fresh)(sample.image, sample.boxes).low_res_logits, ref)
