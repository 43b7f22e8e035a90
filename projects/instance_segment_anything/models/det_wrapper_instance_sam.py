"""DetWrapperInstanceSAM: prompt boxes -> SAM -> instance masks, as an mmdet 2.x detector."""
from __future__ import annotations

from typing import List, Optional

import mmcv
import numpy as np
import torch
from mmdet.core import bbox2result
from mmdet.models import DETECTORS
from mmdet.models.detectors.base import BaseDetector

from ptq4sam.errors import ImageReadError, InputError
from ptq4sam.models import BoxPromptSegmenter, build_sam

from .prompt_sources import PROMPT_SOURCES, Prompts


@DETECTORS.register_module()
class DetWrapperInstanceSAM(BaseDetector):
    """Box-prompted SAM instance segmenter.

    Args:
        prompt: config of the prompt source: ``dict(type='mmdet', config=..., checkpoint=..., score_thr=..,
            max_boxes=..)``, ``dict(type='gt', ann_file=...)`` or ``dict(type='json', result_file=..., ann_file=...)``.
        model_type: ``vit_b`` / ``vit_l`` / ``vit_h`` / ``lite_medsam``.
        sam_checkpoint: path; ``None`` uses the type's default (``ckpt/...`` or the package weights).
        use_sam_iou: final score = prompt score x SAM predicted IoU (else the prompt score alone).
        box_batch: boxes per mask-decoder call (memory bound for 300-900 boxes); None: 64 on a GPU, 4 on a CPU.
    """

    def __init__(self, prompt: dict, model_type: str = "lite_medsam", sam_checkpoint: Optional[str] = None,
                 num_classes: int = 80, use_sam_iou: bool = True, mask_threshold: float = 0.0,
                 box_batch: Optional[int] = None, random_init: bool = False, init_cfg=None, train_cfg=None, test_cfg=None):
        super().__init__(init_cfg)
        if not isinstance(prompt, dict) or "type" not in prompt:
            raise InputError(f"model.prompt must be a dict with a 'type' in {sorted(PROMPT_SOURCES.module_dict)}, "
                             f"got {prompt!r}")
        self.prompt_source = PROMPT_SOURCES.build(prompt)
        self.sam = build_sam(model_type, sam_checkpoint, random_init=random_init)
        self.segmenter = BoxPromptSegmenter(self.sam, mask_threshold=mask_threshold, box_batch=box_batch)
        self.num_classes = num_classes
        self.use_sam_iou = use_sam_iou
        self.model_type = model_type

    # ---- mmdet BaseDetector API -------------------------------------------------------------------
    def extract_feat(self, imgs):  # pragma: no cover - not used: SAM reads the original image
        raise NotImplementedError

    def forward_train(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError("DetWrapperInstanceSAM is inference-only")

    def aug_test(self, imgs, img_metas, **kwargs):  # pragma: no cover
        raise NotImplementedError("test-time augmentation is not supported")

    def load_image(self, meta: dict) -> np.ndarray:
        img = mmcv.imread(meta["filename"], channel_order="rgb")
        if img is None:
            raise ImageReadError(meta["filename"], "cannot be decoded as an image (not an image file, or corrupt)")
        return img

    def segment(self, image: np.ndarray, prompts: Prompts):
        out = self.segmenter(image, prompts.boxes)
        scores = prompts.scores * out.iou.numpy() if self.use_sam_iou else prompts.scores
        return out, scores.astype(np.float32)

    def simple_test(self, img: torch.Tensor, img_metas: List[dict], rescale: bool = True, **kwargs):
        results = []
        for i, (meta, prompts) in enumerate(zip(img_metas, self.prompt_source(img, img_metas))):
            image = self.load_image(meta)
            out, scores = self.segment(image, prompts)
            results.append(self.format_result(prompts, scores, out.masks.numpy()))
        return results

    def format_result(self, prompts: Prompts, scores: np.ndarray, masks: np.ndarray):
        dets = np.concatenate([prompts.boxes, scores[:, None]], 1).astype(np.float32)
        bbox_results = bbox2result(torch.from_numpy(dets), torch.from_numpy(prompts.labels), self.num_classes)
        segm_results = [[] for _ in range(self.num_classes)]
        for m, label in zip(masks, prompts.labels):
            segm_results[int(label)].append(m)
        return bbox_results, segm_results
