"""Evaluation / calibration datasets of an mmdet config and one-image batches (shared by the runner and the
quantization job; imports nothing of either)."""
from __future__ import annotations

from pathlib import Path

import torch


def build_eval_dataset(data_cfg, what: str):
    from mmdet.datasets import build_dataset  # noqa: PLC0415

    from projects.instance_segment_anything.models.prompt_sources import load_coco_json  # noqa: PLC0415

    ann = load_coco_json(data_cfg.ann_file)
    prefix = Path(data_cfg.img_prefix)
    missing = [im["file_name"] for im in ann["images"] if not (prefix / im["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} image(s) of {data_cfg.ann_file} are missing under "
                                f"{prefix}/, e.g. {prefix / missing[0]} (COCO images go in data/coco/, see README)")
    data_cfg = data_cfg.copy()
    data_cfg.test_mode = True
    return build_dataset(data_cfg)


def collate_one(dataset, idx: int, device: torch.device):
    """dataset[idx] (test pipeline, one augmentation) -> (img (1,3,H,W) on device, [img_meta])."""
    sample = dataset[idx]
    img = sample["img"][0] if isinstance(sample["img"], list) else sample["img"]
    metas = sample["img_metas"][0] if isinstance(sample["img_metas"], list) else sample["img_metas"]
    img = img.data if hasattr(img, "data") else img
    metas = metas.data if hasattr(metas, "data") else metas
    return img[None].to(device), [metas]
