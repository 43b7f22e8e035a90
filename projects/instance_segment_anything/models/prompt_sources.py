"""Where the box prompts come from: an mmdet detector, the dataset's ground truth, or a detections JSON.

Every source returns, per image, ``Prompts(boxes (N,4) xyxy in original-image pixels, scores (N,), labels (N,))``.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from mmcv.utils import Registry
from torch import nn

from ptq4sam.annotations import check_coco
from ptq4sam.coco_eval import xywh_to_xyxy
from ptq4sam.errors import InputError, InputNotFound, UnknownName, is_int, is_number
from ptq4sam.models.sam_builder import CheckpointError, load_state_dict_strict, load_weights_file

PROMPT_SOURCES = Registry("prompt source")


@dataclass
class Prompts:
    boxes: np.ndarray  # (N, 4) float32 xyxy, original pixels
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64, 0-based class index in the dataset's CLASSES order

    def top(self, score_thr: float, max_boxes: Optional[int]) -> "Prompts":
        keep = np.nonzero(self.scores >= score_thr)[0]
        keep = keep[np.argsort(-self.scores[keep], kind="stable")]
        if max_boxes is not None:
            keep = keep[:max_boxes]
        return Prompts(self.boxes[keep], self.scores[keep], self.labels[keep])


def _coco_prompts(records: List[dict], scores: np.ndarray, label_of_cat: Dict[int, int]) -> Prompts:
    """COCO records (bbox xywh, category_id) -> Prompts in xyxy with 0-based labels."""
    boxes = xywh_to_xyxy([r["bbox"] for r in records])
    labels = np.array([label_of_cat[r["category_id"]] for r in records], np.int64)
    return Prompts(boxes, scores.astype(np.float32), labels)


def _resolve(path: str, what: str, hint: str = "") -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"{what} not found: {path}{(' — ' + hint) if hint else ''}")
    return p


def read_json(path: str, what: str, hint: str = ""):
    """The JSON document of the file ``path`` (UTF-8), or an input error naming it and what is wrong."""
    p = _resolve(path, what, hint)
    raw = p.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {what} is not UTF-8 text (byte {e.start}); expected JSON") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: {what} is {'empty' if not raw.strip() else 'not valid JSON'} ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: {what} nests too deeply to be read") from None


def load_coco_json(path: str, warn: Optional[list] = None) -> dict:
    """Read a COCO annotation file and check what the toolkit relies on (ptq4sam.annotations.check_coco); warning
    lines are appended to ``warn`` (else issued as warnings)."""
    ann = read_json(path, "annotation file")
    notes = check_coco(ann, str(path))
    if warn is not None:
        warn.extend(notes)
    else:
        for n in notes:
            warnings.warn(n, stacklevel=2)
    return ann


def load_coco_jsons(paths) -> dict:
    """One or several COCO files (e.g. the evaluation and the calibration split) merged into one."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise InputError("no annotation file given")
    anns = [load_coco_json(str(p)) for p in paths]
    merged = {"images": [], "annotations": [], "categories": anns[0]["categories"]}
    for p, a in zip(paths, anns):
        if [c["id"] for c in a["categories"]] != [c["id"] for c in merged["categories"]]:
            raise InputError(f"{p}: categories differ from those of {paths[0]}")
        merged["images"] += a["images"]
        merged["annotations"] += a["annotations"]
    return merged


class _ByFileName:
    """Maps an image's file name (as in img_metas['ori_filename']) to its COCO image id."""

    def __init__(self, ann: dict):
        self.ids = {os.path.basename(im["file_name"]): im["id"] for im in ann["images"]}
        self.label_of_cat = {c["id"]: i for i, c in enumerate(sorted(ann["categories"], key=lambda c: c["id"]))}

    def image_id(self, meta: dict) -> int:
        name = os.path.basename(meta["ori_filename"])
        if name not in self.ids:
            raise UnknownName(f"image {name} is not in the prompt source's annotation file")
        return self.ids[name]


@PROMPT_SOURCES.register_module(name="gt")
class GTBoxPrompts(nn.Module):
    """Ground-truth boxes of the dataset as prompts (class = GT class, score 1; SAM's IoU is the final score)."""

    def __init__(self, ann_file, include_crowd: bool = False):
        super().__init__()
        ann = load_coco_jsons(ann_file)
        self.index = _ByFileName(ann)
        self.per_image: Dict[int, List[dict]] = defaultdict(list)
        for a in ann["annotations"]:
            if a.get("iscrowd", 0) and not include_crowd:
                continue
            x, y, w, h = a["bbox"]
            if w < 1 or h < 1:
                continue
            self.per_image[a["image_id"]].append(a)

    def forward(self, img: torch.Tensor, img_metas: List[dict]) -> List[Prompts]:
        out = []
        for meta in img_metas:
            anns = self.per_image.get(self.index.image_id(meta), [])
            out.append(_coco_prompts(anns, np.ones(len(anns)), self.index.label_of_cat))
        return out


@PROMPT_SOURCES.register_module(name="json")
class JsonPrompts(nn.Module):
    """Cached detections: a COCO results JSON (list of {image_id, bbox xywh, score, category_id})."""

    def __init__(self, result_file: str, ann_file, score_thr: float = 0.0, max_boxes: Optional[int] = 100):
        super().__init__()
        self.index = _ByFileName(load_coco_jsons(ann_file))
        dets = read_json(result_file, "detection results JSON", "run the detector once with --out or tools/ to make it")
        if not isinstance(dets, list):
            raise InputError(f"{result_file}: expected a COCO results list, got {type(dets).__name__}")
        self.per_image: Dict[int, List[dict]] = defaultdict(list)
        known = set(self.index.ids.values())
        degenerate, unknown = 0, set()
        for i, d in enumerate(dets):
            if not isinstance(d, dict):
                raise InputError(f"{result_file}: entry {i} is {type(d).__name__}, expected an object with image_id, "
                                 "bbox, score, category_id")
            missing = {"image_id", "bbox", "score", "category_id"} - set(d)
            if missing:
                raise InputError(f"{result_file}: entry {i} lacks {sorted(missing)}")
            box, score = d["bbox"], d["score"]
            if (not isinstance(box, list) or len(box) != 4
                    or not all(is_number(v) for v in box)):
                raise InputError(f"{result_file}: entry {i} (image {d['image_id']}): bbox must be 4 finite numbers "
                                 f"[x, y, w, h], got {box!r}")
            if not is_number(score):
                raise InputError(f"{result_file}: entry {i} (image {d['image_id']}): score must be a finite number, "
                                 f"got {score!r}")
            if not is_int(d["image_id"]):
                raise InputError(f"{result_file}: entry {i}: image_id must be an integer, got {d['image_id']!r}")
            if not is_int(d["category_id"]) or d["category_id"] not in self.index.label_of_cat:
                raise InputError(f"{result_file}: entry {i}: category_id {d['category_id']!r} is not a category of "
                                 f"the annotation file (ids {sorted(self.index.label_of_cat)[:8]}...)")
            if d["image_id"] not in known:
                unknown.add(d["image_id"])
                continue
            if box[2] <= 0 or box[3] <= 0:  # no area: SAM has nothing to segment
                degenerate += 1
                continue
            self.per_image[d["image_id"]].append(d)
        if dets and len(unknown) == len({d["image_id"] for d in dets}):
            raise InputError(f"{result_file}: none of its image ids (e.g. {sorted(unknown)[:5]}) is an image of the "
                             f"annotation file(s) {ann_file}: detections of another split?")
        if unknown:
            warnings.warn(f"{result_file}: detections for {len(unknown)} image id(s) not in the annotation file(s) are "
                          f"ignored (e.g. {sorted(unknown)[:5]})", stacklevel=2)
        if degenerate:
            warnings.warn(f"{result_file}: {degenerate} detection(s) with width or height <= 0 are ignored",
                          stacklevel=2)
        self.score_thr, self.max_boxes = score_thr, max_boxes
        self.outside = 0  # boxes wholly outside their image (dropped)

    def forward(self, img: torch.Tensor, img_metas: List[dict]) -> List[Prompts]:
        out = []
        for meta in img_metas:
            dets = self.per_image.get(self.index.image_id(meta), [])
            scores = np.array([d["score"] for d in dets], np.float32)
            p = _coco_prompts(dets, scores, self.index.label_of_cat).top(self.score_thr, self.max_boxes)
            out.append(drop_outside(p, meta["ori_shape"][:2], self))
        return out


def drop_outside(p: Prompts, hw, counter=None) -> Prompts:
    """Boxes with no area inside the image are dropped (counted on ``counter.outside``, warned once). Boxes reaching
    partly outside are kept as they are: detectors give such boxes and SAM takes them (the JSON path then equals the
    detector path exactly)."""
    h, w = hw
    b = p.boxes
    inside = (np.minimum(b[:, 2], w) > np.maximum(b[:, 0], 0)) & (np.minimum(b[:, 3], h) > np.maximum(b[:, 1], 0))
    if counter is not None and not inside.all():
        if counter.outside == 0:
            warnings.warn(f"prompt boxes wholly outside their image are dropped (first: {b[~inside][0].tolist()} in "
                          f"a {w}x{h} image)", stacklevel=2)
        counter.outside += int((~inside).sum())
    return Prompts(b[inside], p.scores[inside], p.labels[inside])


@PROMPT_SOURCES.register_module(name="mmdet")
class DetectorPrompts(nn.Module):
    """Any mmdet 2.x detector (config + checkpoint, loaded strictly)."""

    def __init__(self, config: str, checkpoint: Optional[str], score_thr: float = 0.05,
                 max_boxes: Optional[int] = 100, download: str = "", random_init: bool = False):
        super().__init__()
        from mmcv import Config  # noqa: PLC0415
        from mmdet.models import build_detector  # noqa: PLC0415

        cfg = Config.fromfile(str(_resolve(config, "detector config")))
        cfg.model.pop("pretrained", None)
        if cfg.model.get("backbone", {}).get("init_cfg"):
            cfg.model.backbone.init_cfg = None
        self.detector = build_detector(cfg.model, test_cfg=None if "test_cfg" in cfg.model else cfg.get("test_cfg"))
        if not random_init:
            if checkpoint is None:
                raise InputError(f"detector {config}: 'checkpoint' is required (or random_init=True for tests)")
            _resolve(checkpoint, "detector checkpoint", download or "see ckpt/README.md")
            # tensors only (weights_only=True: a checkpoint from elsewhere runs no code), then a strict load
            ckpt = load_weights_file(checkpoint, "mmdet detector checkpoint")
            state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
            if not isinstance(state, dict):
                raise CheckpointError(f"{checkpoint}: expected a state dict (or a dict with 'state_dict')")
            load_state_dict_strict(self.detector, {k[7:] if k.startswith("module.") else k: v
                                                   for k, v in state.items()}, str(checkpoint))
        self.detector.eval()
        self.detector.CLASSES = None
        self.score_thr, self.max_boxes = score_thr, max_boxes

    @torch.no_grad()
    def forward(self, img: torch.Tensor, img_metas: List[dict]) -> List[Prompts]:
        results = self.detector.simple_test(img, img_metas, rescale=True)
        out = []
        for res in results:
            if isinstance(res, tuple):
                res = res[0]
            labels = np.concatenate([np.full(len(r), c, np.int64) for c, r in enumerate(res)])
            dets = np.concatenate(res, 0).astype(np.float32) if len(res) else np.zeros((0, 5), np.float32)
            out.append(Prompts(dets[:, :4], dets[:, 4], labels).top(self.score_thr, self.max_boxes))
        return out
