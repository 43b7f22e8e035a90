"""DETR-family prompt source: H-Deformable-DETR or DINO boxes (top-k over queries x classes, no NMS)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from torch import nn

from ..prompt_sources import PROMPT_SOURCES, Prompts
from . import focalnet  # noqa: F401  (registers FocalNet in mmdet's BACKBONES)
from .common import boxes_to_image, coco91_to_80
from .convert import OFFICIAL_PREFIX, load_official
from .dino import DINO
from .hdetr import HDeformableDETR

DETR_MODELS = {"HDeformableDETR": HDeformableDETR, "DINO": DINO}


def build_detr(cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in DETR_MODELS:
        raise ValueError(f"prompt.detector.type must be one of {sorted(DETR_MODELS)}, got {kind!r}")
    try:
        return DETR_MODELS[kind](**cfg)
    except TypeError as e:
        raise ValueError(f"prompt.detector ({kind}): {e}") from e


@PROMPT_SOURCES.register_module(name="detr")
class DETRPrompts(nn.Module):
    """Args:
        detector: ``dict(type='HDeformableDETR' | 'DINO', backbone=<mmdet backbone config>, backbone_channels=[...],
            ...)``.
        checkpoint: the official release file; ``ckpt_backbone`` (resnet / swin / focalnet) tells how its backbone
            keys are named. Loaded strictly (see ``convert.py``).
        topk: boxes kept by the DETR post-processing (top-k of sigmoid scores over queries x classes; Deformable DETR
            uses 100, DINO 300). ``score_thr`` / ``max_boxes`` then cap what reaches SAM (memory: every box is a
            mask-decoder prompt).
    """

    def __init__(self, detector: dict, checkpoint: Optional[str], ckpt_backbone: str, topk: int = 100,
                 score_thr: float = 0.0, max_boxes: Optional[int] = None, download: str = "",
                 random_init: bool = False):
        super().__init__()
        if ckpt_backbone not in OFFICIAL_PREFIX:
            raise ValueError(f"prompt.ckpt_backbone must be one of {sorted(OFFICIAL_PREFIX)}, got {ckpt_backbone!r}")
        self.detector = build_detr(detector).eval()
        if not random_init:
            if checkpoint is None:
                raise ValueError("prompt.checkpoint is required (or random_init=True for tests)")
            load_official(self.detector, checkpoint, ckpt_backbone, download)
        self.topk, self.score_thr, self.max_boxes = topk, score_thr, max_boxes
        self.register_buffer("label_map", coco91_to_80(), persistent=False)

    @torch.no_grad()
    def forward(self, img: torch.Tensor, img_metas: List[dict]) -> List[Prompts]:
        logits, boxes = self.detector(img, img_metas)
        out = []
        for lg, bx, meta in zip(logits, boxes, img_metas):
            prob = lg.sigmoid()
            scores, idx = torch.topk(prob.reshape(-1), min(self.topk, prob.numel()))
            q, cls91 = idx // prob.shape[1], idx % prob.shape[1]
            labels = self.label_map.to(cls91.device)[cls91.clamp(max=90)]
            keep = (labels >= 0) & (cls91 <= 90)
            xyxy = boxes_to_image(bx[q[keep]].float(), meta)
            out.append(Prompts(xyxy.cpu().numpy().astype(np.float32), scores[keep].cpu().numpy().astype(np.float32),
                               labels[keep].cpu().numpy().astype(np.int64)).top(self.score_thr, self.max_boxes))
        return out
