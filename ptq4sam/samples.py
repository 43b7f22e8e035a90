"""Calibration samples and the recording of float activations (torch only).

Calibration data is a list of ``CalibSample(image RGB uint8, boxes (N,4) xyxy)``; where the boxes come from
(GT, detector, JSON) is the caller's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .progress import progress as _progress
from .quantization import FakeQuantizeBase
from .quantization.qmodules import _QuantWeightMixin


@dataclass
class CalibSample:
    image: np.ndarray
    boxes: np.ndarray


def gt_box_samples(ann: dict, img_dir, n: Optional[int]) -> List[CalibSample]:
    """The first ``n`` images by id of a COCO annotation dict (``coco_eval.load_ann``) with their GT boxes (xyxy), as
    calibration samples: the benchmarks' calibration set."""
    from . import coco_eval  # noqa: PLC0415

    prompts = coco_eval.gt_prompts(ann)
    return [CalibSample(coco_eval.read_rgb(Path(img_dir) / im["file_name"]), prompts[im["id"]][0])
            for im in coco_eval.first_images(ann, n)]


def forward_sample(seg, sample: CalibSample, feats: Optional[torch.Tensor] = None):
    """Encoder (unless its output ``feats`` is given) + decoder on the sample's boxes."""
    if feats is None:
        feats, _, original_size = seg.encode(sample.image)
    else:
        original_size = tuple(sample.image.shape[:2])
    boxes = torch.as_tensor(np.asarray(sample.boxes, np.float32).reshape(-1, 4))
    if boxes.shape[0] == 0:
        return feats
    return seg.decode(feats, boxes, original_size)



def quantized_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, _QuantWeightMixin)]


def act_quantizers(model: nn.Module):
    return [q for q in model.modules() if isinstance(q, FakeQuantizeBase) and not q.is_weight]


@torch.no_grad()
def record(seg, samples, attentions, keys, desc="record", rows_per_image: Optional[int] = None, feats=None,
           each: Optional[Callable[[Dict[int, Dict[str, torch.Tensor]]], None]] = None):
    """Run float forwards and collect ``keys`` ('k_post', 'attn', 'v') from each attention: per attention id and key,
    one tensor per sample (the sample's calls concatenated along dim 0, i.e. all its prompts).

    ``feats``: the samples' image embeddings (runs the decoder only). ``rows_per_image``: keep a seeded random subset
    of that many token rows per sample (rows drawn at random, not strided: a stride aliases with the token layout).
    ``each``: called with every sample's record instead of keeping them all (bounded memory)."""
    out: Dict[int, Dict[str, List[torch.Tensor]]] = {id(a): {k: [] for k in keys} for a in attentions}
    gen = torch.Generator().manual_seed(0)
    try:
        for i, s in enumerate(_progress(samples, desc=desc)):
            for a in attentions:
                a.record = {k: [] for k in keys}
            forward_sample(seg, s, None if feats is None else feats[i])
            cur = {id(a): {k: torch.cat(a.record[k]) for k in keys if a.record[k]} for a in attentions}
            if rows_per_image:
                for rec in cur.values():
                    for k, t in rec.items():
                        rows = t.reshape(-1, t.shape[-1])
                        if rows.shape[0] > rows_per_image:
                            sel = torch.randperm(rows.shape[0], generator=gen)[:rows_per_image].to(rows.device)
                            rows = rows.index_select(0, sel)
                        rec[k] = rows
            if each is not None:
                each(cur)
            else:
                for aid, rec in cur.items():
                    for k, t in rec.items():
                        out[aid][k].append(t)
    finally:
        for a in attentions:
            a.record = None
    return out



def has_boxes(s: CalibSample) -> bool:
    return np.asarray(s.boxes).reshape(-1, 4).shape[0] > 0

