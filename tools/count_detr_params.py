"""Parameter counts of the DETR-family prompt detectors (random weights) beside the sizes their papers publish, so a
wrong architecture shows up as a wrong count. Also counts the reference variants the papers measured (Deformable DETR
with 1024-wide FFNs, DINO-4scale with ResNet-50, FocalNet-L in its published classification form: srf = focal
level 2, patch embedding, with a classifier head).

    python tools/count_detr_params.py [--json out.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import projects.instance_segment_anything  # noqa: E402, F401
from projects.instance_segment_anything.models.detr import build_detr  # noqa: E402

CONFIGS = {
    "H-Deformable-DETR R50": "projects/configs/hdetr/r50-hdetr_sam-vit-b.py",
    "H-Deformable-DETR Swin-T": "projects/configs/hdetr/swin-t-hdetr_sam-vit-b.py",
    "H-Deformable-DETR Swin-L": "projects/configs/hdetr/swin-l-hdetr_sam-vit-b.py",
    "DINO FocalNet-L (fl4, 5 scales)": "projects/configs/focalnet_dino/focalnet-l-dino_sam-vit-b.py",
}
R50 = dict(type="ResNet", depth=50, num_stages=4, out_indices=(1, 2, 3), frozen_stages=-1,
           norm_cfg=dict(type="BN", requires_grad=False), norm_eval=True, style="pytorch")
# (name, what we count, published figure, source)
PUBLISHED = {
    "ResNet-50 backbone": ("23.5M without its fc (25.6M with the 1000-class fc)", "He et al. 2016 / torchvision"),
    "Swin-T backbone": ("28M with the ImageNet classifier head (0.77M)", "Liu et al. 2021 (Swin), Table 1"),
    "Swin-L backbone": ("197M with the ImageNet classifier head (1.5M)", "Liu et al. 2021 (Swin), Table 1"),
    "FocalNet-L srf (fl2) + classifier head": ("197.1M", "Yang et al. 2022 (FocalNet), ImageNet table (FocalNet-L srf)"),
    "Deformable DETR two-stage + refine, R50, FFN 1024, 300 queries": ("40M", "Zhu et al. 2021, Table 1"),
    "DINO-4scale R50": ("47M", "Zhang et al. 2023 (DINO), Table 1"),
}


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())  # shared heads counted once


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from mmcv import Config  # noqa: PLC0415

    torch.manual_seed(0)
    rows = []

    def add(name, model, backbone=None, extra=0):
        total = count(model) + extra
        bb = count(backbone if backbone is not None else model.backbone) if hasattr(model, "backbone") or backbone \
            else None
        pub = PUBLISHED.get(name, ("", ""))
        rows.append({"model": name, "params_M": round(total / 1e6, 2), "backbone_M": None if bb is None else
                     round(bb / 1e6, 2), "published": pub[0], "source": pub[1]})
        print(f"{name:66s} {total / 1e6:8.2f}M" + (f"  (backbone {bb / 1e6:.2f}M)" if bb is not None else "")
              + (f"   published: {pub[0]} [{pub[1]}]" if pub[0] else ""))

    dets = {}
    for name, cfg_path in CONFIGS.items():
        cfg = Config.fromfile(str(ROOT / cfg_path)).model.prompt.detector
        dets[name] = build_detr(dict(cfg))
        add(name, dets[name])
    add("ResNet-50 backbone", dets["H-Deformable-DETR R50"].backbone, dets["H-Deformable-DETR R50"].backbone)
    add("Swin-T backbone", dets["H-Deformable-DETR Swin-T"].backbone, dets["H-Deformable-DETR Swin-T"].backbone)
    add("Swin-L backbone", dets["H-Deformable-DETR Swin-L"].backbone, dets["H-Deformable-DETR Swin-L"].backbone)
    from projects.instance_segment_anything.models.detr.focalnet import FocalNet  # noqa: PLC0415

    fl2_cls = FocalNet(embed_dim=192, depths=[2, 2, 18, 2], out_indices=(3,), focal_levels=[2] * 4, focal_windows=[3] * 4)
    add("FocalNet-L srf (fl2) + classifier head", fl2_cls, fl2_cls, extra=count(nn.Linear(1536, 1000)))
    add("Deformable DETR two-stage + refine, R50, FFN 1024, 300 queries",
        build_detr(dict(type="HDeformableDETR", backbone=R50, backbone_channels=[512, 1024, 2048], d_ffn=1024,
                        num_queries_one2many=0)))
    add("DINO-4scale R50", build_detr(dict(type="DINO", backbone=R50, backbone_channels=[512, 1024, 2048],
                                           num_feature_levels=4)))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
