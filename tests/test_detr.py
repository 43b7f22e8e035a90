"""H-Deformable-DETR / DINO prompt detectors: ops, configs, checkpoint conversion (random weights, CPU)."""
import argparse
import json

import numpy as np
import pytest
import torch
from conftest import DATA, ROOT, needs_mmdet

pytestmark = needs_mmdet

DETR_CONFIGS = {
    "r50_hdetr": "projects/configs/hdetr/r50-hdetr_sam-vit-b.py",
    "swin_t_hdetr": "projects/configs/hdetr/swin-t-hdetr_sam-vit-b.py",
    "swin_l_hdetr": "projects/configs/hdetr/swin-l-hdetr_sam-vit-b.py",
    "focalnet_l_dino": "projects/configs/focalnet_dino/focalnet-l-dino_sam-vit-b.py",
}


def prompt_cfg(name):
    from mmcv import Config

    import projects.instance_segment_anything  # noqa: F401

    return Config.fromfile(str(ROOT / DETR_CONFIGS[name])).model.prompt


def ms_inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[9, 11], [5, 6], [3, 3]])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), shapes.prod(1).cumsum(0)[:-1]])
    b, heads, d, q, points = 2, 4, 8, 7, 3
    value = torch.randn(b, int(shapes.prod(1).sum()), heads, d, generator=g, dtype=dtype)
    loc = torch.rand(b, q, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2  # some outside
    w = torch.rand(b, q, heads, len(shapes), points, generator=g, dtype=dtype).softmax(-1)
    return value, shapes, starts, loc, w


def test_ms_deform_attn_compiled_cpu_op_equals_pytorch():
    from projects.instance_segment_anything.ops import load_cpu_extension, ms_deform_attn

    assert load_cpu_extension(build=True) is not None
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        args = ms_inputs(dtype)
        ref = ms_deform_attn(*args, impl="pytorch")
        out = ms_deform_attn(*args, impl="cpu")
        assert out.shape == (2, 7, 32)
        assert torch.allclose(out, ref, atol=tol, rtol=0), (dtype, (out - ref).abs().max())
        assert torch.equal(ms_deform_attn(*args, impl="auto"), out)  # auto picks the built op on CPU
    with pytest.raises(ValueError, match="impl must be"):
        ms_deform_attn(*ms_inputs(), impl="triton")


@pytest.mark.parametrize("name", list(DETR_CONFIGS))
def test_detr_config_builds_and_returns_prompt_boxes(name):
    from projects.instance_segment_anything.models import PROMPT_SOURCES

    cfg = prompt_cfg(name)
    cfg.random_init = True
    src = PROMPT_SOURCES.build(cfg)
    torch.manual_seed(0)
    img = torch.randn(1, 3, 96, 128)
    meta = dict(img_shape=(90, 120, 3), ori_shape=(180, 240, 3), scale_factor=np.array([0.5, 0.5, 0.5, 0.5]))
    (p,) = src(img, [meta])
    expect_topk = 300 if name == "focalnet_l_dino" else 100
    assert src.topk == expect_topk and 0 < len(p.boxes) <= expect_topk
    assert p.boxes.dtype == np.float32 and p.boxes.shape == (len(p.scores), 4)
    assert p.labels.dtype == np.int64 and p.labels.min() >= 0 and p.labels.max() < 80
    assert (p.boxes[:, 2] >= p.boxes[:, 0]).all() and (p.boxes[:, 3] >= p.boxes[:, 1]).all()
    assert p.boxes.min() >= 0 and (p.boxes[:, [0, 2]] <= 240 + 1e-3).all() and (p.boxes[:, [1, 3]] <= 180 + 1e-3).all()
    assert (np.diff(p.scores) <= 0).all() and ((p.scores > 0) & (p.scores < 1)).all()
    queries = {"r50_hdetr": 300, "swin_t_hdetr": 300, "swin_l_hdetr": 900, "focalnet_l_dino": 900}[name]
    det = src.detector
    assert (det.transformer.num_queries if name == "focalnet_l_dino" else det.num_queries) == queries


def _reference_swin_patch_merging(x, H, W, norm, reduction):
    """The official Swin PatchMerging (x0..x3 strided gathers, concatenated) as written in the Swin release."""
    B, L, C = x.shape
    x = x.view(B, H, W, C)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(B, -1, 4 * C)
    return torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (4 * C,), norm[0], norm[1]), reduction)


def _reference_relative_position_index(w):
    coords = torch.stack(torch.meshgrid([torch.arange(w), torch.arange(w)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def test_official_swin_layout_computes_what_mmdet_swin_computes():
    """The renamed weights mean the same thing: the official PatchMerging on the official-layout weights equals mmdet's
    PatchMerging on ours, and the official relative-position index equals mmdet's buffer."""
    from projects.instance_segment_anything.models.detr import build_detr, to_official

    cfg = dict(prompt_cfg("swin_t_hdetr").detector)
    model = build_detr(cfg).eval()
    off = to_official(model.state_dict(), "swin")
    merge = model.backbone.stages[0].downsample
    x = torch.randn(1, 8 * 6, 96)
    with torch.no_grad():
        ours, _ = merge(x, (8, 6))
        ref = _reference_swin_patch_merging(x, 8, 6, (off["backbone.0.body.layers.0.downsample.norm.weight"],
                                                      off["backbone.0.body.layers.0.downsample.norm.bias"]),
                                            off["backbone.0.body.layers.0.downsample.reduction.weight"])
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(off["backbone.0.body.layers.0.blocks.0.attn.relative_position_index"],
                       _reference_relative_position_index(7))


@pytest.mark.parametrize("kind", ["resnet", "swin", "focalnet"])
def test_checkpoint_round_trip_through_official_layout_is_strict(kind, tmp_path):
    from projects.instance_segment_anything.models.detr import CheckpointKeyError, build_detr, load_official, to_official

    if kind == "resnet":
        cfg = dict(prompt_cfg("r50_hdetr").detector)
    elif kind == "swin":
        cfg = dict(prompt_cfg("swin_t_hdetr").detector)
    else:  # FocalNet-DINO with a small FocalNet (same module names as FocalNet-L)
        cfg = dict(prompt_cfg("focalnet_l_dino").detector)
        cfg["backbone"] = dict(cfg["backbone"], embed_dim=32, depths=[1, 1, 1, 1])
        cfg["backbone_channels"] = [32, 64, 128, 256]
    torch.manual_seed(1)
    src_model = build_detr(cfg).eval()
    with torch.no_grad():
        for p in src_model.parameters():  # make every tensor distinguishable from a fresh init
            p.add_(torch.randn_like(p) * 1e-3)
    official = to_official(src_model.state_dict(), kind)
    assert not any(k.startswith("backbone.") and not k.startswith("backbone.0.") for k in official)
    if kind == "resnet":
        assert "backbone.0.body.layer1.0.bn1.running_var" in official
        assert not any(k.endswith("num_batches_tracked") for k in official)
    path = tmp_path / "release.pth"
    torch.save({"model": official, "args": argparse.Namespace(lr=2e-4, backbone=kind), "epoch": 35}, path)
    torch.manual_seed(2)
    dst = build_detr(cfg).eval()
    load_official(dst, str(path), kind)
    for k, v in src_model.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    img = torch.randn(1, 3, 64, 96)
    meta = [dict(img_shape=(64, 90, 3))]
    with torch.no_grad():
        a, b = src_model(img, meta), dst(img, meta)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    broken = dict(official)
    gone = "transformer.level_embed" if kind != "focalnet" else "transformer.tgt_embed.weight"
    broken.pop(gone)
    broken["transformer.not_a_layer.weight"] = torch.zeros(1)
    torch.save({"model": broken}, path)
    with pytest.raises(CheckpointKeyError) as e:
        load_official(dst, str(path), kind)
    assert gone in str(e.value) and "transformer.not_a_layer.weight" in str(e.value)
    assert "missing keys (1)" in str(e.value) and "unexpected keys (1)" in str(e.value)


def test_missing_detector_checkpoint_names_the_release_file():
    from projects.instance_segment_anything.models import PROMPT_SOURCES

    cfg = prompt_cfg("r50_hdetr")
    cfg.checkpoint = "ckpt/definitely_missing_hdetr.pth"
    with pytest.raises(FileNotFoundError, match="r50_hybrid_branch_lambda1_group6_t1500"):
        PROMPT_SOURCES.build(cfg)


def test_coco91_label_map_matches_the_coco_categories():
    from projects.instance_segment_anything.models.detr.common import coco91_to_80

    cats = sorted(c["id"] for c in json.loads((DATA / "annotations" / "instances_eval96.json").read_text())["categories"])
    lut = coco91_to_80()
    assert [int(lut[c]) for c in cats] == list(range(80))
    assert int((lut >= 0).sum()) == 80


def test_detr_prompts_drive_sam_end_to_end():
    """H-DETR (random weights) boxes -> LiteMedSAM masks through the mmdet wrapper, with the box cap applied."""
    import mmcv
    from mmcv import Config
    from mmdet.models import build_detector

    cfg = Config.fromfile(str(ROOT / DETR_CONFIGS["r50_hdetr"]))
    cfg.model.prompt.random_init = True
    cfg.model.prompt.max_boxes = 5
    cfg.model.model_type, cfg.model.sam_checkpoint = "lite_medsam", None
    model = build_detector(cfg.model).eval()
    name = json.loads((DATA / "annotations" / "instances_eval96.json").read_text())["images"][0]["file_name"]
    image = mmcv.imread(str(DATA / "train2017" / name))
    h, w = image.shape[:2]
    img = torch.randn(1, 3, (h // 32) * 16, (w // 32) * 16)
    meta = dict(filename=str(DATA / "train2017" / name), ori_filename=name, ori_shape=image.shape,
                img_shape=img.shape[2:] + (3,), scale_factor=np.array([0.5, 0.5, 0.5, 0.5], np.float32))
    with torch.no_grad():
        (bbox_res, segm_res), = model.simple_test(img, [meta])
    assert len(bbox_res) == 80 and sum(len(b) for b in bbox_res) == 5
    masks = [m for per_class in segm_res for m in per_class]
    assert len(masks) == 5 and all(m.shape == (h, w) and m.dtype == bool for m in masks)


def test_parameter_counts_match_published_sizes():
    """Architectures against the sizes their papers publish (tools/count_detr_params.py prints them all)."""
    from torch import nn

    from projects.instance_segment_anything.models.detr import build_detr
    from projects.instance_segment_anything.models.detr.focalnet import FocalNet

    def count(m):
        return sum(p.numel() for p in m.parameters())

    r50 = dict(prompt_cfg("r50_hdetr").detector)
    assert count(build_detr(r50).backbone) == 23_508_032  # torchvision resnet50 without fc: 25,557,032 - 2,049,000
    swin_t = build_detr(dict(prompt_cfg("swin_t_hdetr").detector)).backbone
    assert abs((count(swin_t) + count(nn.Linear(768, 1000))) / 1e6 - 28.3) < 0.1  # Swin-T: 28M (28.29M in timm)
    swin_l = build_detr(dict(prompt_cfg("swin_l_hdetr").detector)).backbone
    assert abs((count(swin_l) + count(nn.Linear(1536, 1000))) / 1e6 - 196.7) < 0.3  # Swin-L: 197M
    focal_srf = FocalNet(embed_dim=192, depths=[2, 2, 18, 2], out_indices=(3,), focal_levels=[2] * 4,
                         focal_windows=[3] * 4)
    assert abs((count(focal_srf) + count(nn.Linear(1536, 1000))) / 1e6 - 197.1) < 0.05  # FocalNet-L (srf): 197.1M
    dino_r50 = build_detr(dict(type="DINO", backbone=r50["backbone"], backbone_channels=[512, 1024, 2048],
                               num_feature_levels=4))
    assert abs(count(dino_r50) / 1e6 - 47.0) < 0.25  # DINO-4scale R50: 47M


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_our_msdeformattn_equals_mmcv_multiscale_deformable_attention(ref_dim):
    """Same parameter names and the same function as mmcv's MultiScaleDeformableAttention (which adds its input
    back as a residual, so ours + query == mmcv's)."""
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention

    from projects.instance_segment_anything.models.detr.common import MSDeformAttn

    torch.manual_seed(0)
    ours = MSDeformAttn(64, n_levels=3, n_heads=4, n_points=2, impl="pytorch").eval()
    theirs = MultiScaleDeformableAttention(64, num_heads=4, num_levels=3, num_points=2, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    shapes = torch.tensor([[9, 11], [5, 6], [3, 3]])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), shapes.prod(1).cumsum(0)[:-1]])
    value = torch.randn(2, int(shapes.prod(1).sum()), 64)
    query = torch.randn(2, 7, 64)
    ref = torch.rand(2, 7, 3, ref_dim)
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[1, -20:] = True
    with torch.no_grad():
        a = ours(query, ref, value, shapes, starts, mask)
        b = theirs(query, value=value, reference_points=ref, spatial_shapes=shapes, level_start_index=starts,
                   key_padding_mask=mask)
    assert torch.allclose(a + query, b, atol=1e-5)
