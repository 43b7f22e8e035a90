"""Torch-only COCO evaluation of a BoxPromptSegmenter (no mmcv/mmdet): GT or cached-detection prompts ->
masks -> pycocotools segm / bbox mAP. Used by the benchmarks, which must also run on machines without mmcv.
Gives the same numbers as the mmdet pipeline (tested)."""
from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import InputError, InputNotFound
from .images import read_rgb
from .progress import progress

Prompt = Tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N,4) xyxy, scores (N,), category ids (N,)


def load_ann(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"annotation file not found: {path}")
    ann = json.loads(p.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in ann:
            raise InputError(f"{path}: COCO annotation file has no '{key}' list")
    return ann


def xywh_to_xyxy(xywh) -> np.ndarray:
    """COCO [x, y, w, h] boxes -> (N, 4) float32 [x1, y1, x2, y2]."""
    a = np.asarray(xywh, np.float32).reshape(-1, 4)
    return np.concatenate([a[:, :2], a[:, :2] + a[:, 2:]], 1)


def gt_prompts(ann: dict) -> Dict[int, Prompt]:
    per = defaultdict(list)
    for a in ann["annotations"]:
        if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1:
            per[a["image_id"]].append(a)
    return {im["id"]: (xywh_to_xyxy([a["bbox"] for a in per[im["id"]]]), np.ones(len(per[im["id"]]), np.float32),
                       np.array([a["category_id"] for a in per[im["id"]]], np.int64)) for im in ann["images"]}


def json_prompts(ann: dict, dets_file, score_thr=0.05, max_boxes: Optional[int] = 100) -> Dict[int, Prompt]:
    dets = json.loads(Path(dets_file).read_text())
    per = defaultdict(list)
    for d in dets:
        if d["score"] >= score_thr:
            per[d["image_id"]].append(d)
    out = {}
    for im in ann["images"]:
        ds = sorted(per[im["id"]], key=lambda d: -d["score"])[:max_boxes]
        out[im["id"]] = (xywh_to_xyxy([d["bbox"] for d in ds]), np.array([d["score"] for d in ds], np.float32),
                         np.array([d["category_id"] for d in ds], np.int64))
    return out


def first_images(ann: dict, n: Optional[int] = None) -> List[dict]:
    ims = sorted(ann["images"], key=lambda i: i["id"])
    return ims if n is None else ims[:n]


def encode_masks(masks: torch.Tensor) -> List[dict]:
    """(N, H, W) bool masks -> N COCO RLEs (pycocotools)."""
    from pycocotools import mask as mask_utils  # noqa: PLC0415

    return mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))


@torch.no_grad()
def predict(seg, ann: dict, img_dir, prompts: Dict[int, Prompt], use_sam_iou=True, max_images=None,
            desc="eval") -> List[dict]:
    results = []
    for im in progress(first_images(ann, max_images), desc=desc):
        boxes, scores, cats = prompts[im["id"]]
        if len(boxes) == 0:
            continue
        out = seg(read_rgb(Path(img_dir) / im["file_name"]), boxes)
        final = scores * out.iou.numpy() if use_sam_iou else scores
        rles = encode_masks(out.masks)
        for b, s, c, rle in zip(boxes, final, cats, rles):
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": im["id"], "category_id": int(c), "score": float(s), "segmentation": rle,
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    return results


def coco_metrics(ann_file, results: List[dict], image_ids: List[int]) -> Dict[str, float]:
    from pycocotools.coco import COCO  # noqa: PLC0415
    from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        for iou_type in ("segm", "bbox"):
            if not results:
                out.update({f"{iou_type}_mAP": 0.0, f"{iou_type}_mAP_50": 0.0, f"{iou_type}_mAP_75": 0.0})
                continue
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.params.imgIds = image_ids
            ev.params.maxDets = [100, 300, 1000]  # as mmdet's CocoDataset.evaluate
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out.update({f"{iou_type}_mAP": round(float(ev.stats[0]), 4), f"{iou_type}_mAP_50": round(float(ev.stats[1]), 4),
                        f"{iou_type}_mAP_75": round(float(ev.stats[2]), 4)})
    return out


def evaluate(seg, ann_file, img_dir, prompts, use_sam_iou=True, max_images=None, desc="eval") -> Dict[str, float]:
    ann = load_ann(ann_file)
    res = predict(seg, ann, img_dir, prompts, use_sam_iou, max_images, desc)
    ids = [im["id"] for im in first_images(ann, max_images)]
    return {**coco_metrics(ann_file, res, ids), "num_images": len(ids)}
