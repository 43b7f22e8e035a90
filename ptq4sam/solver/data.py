"""Evaluation / calibration datasets of an mmdet config and one-image batches (shared by the runner and the
quantization job; imports nothing of either)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ptq4sam import images
from ptq4sam.errors import ImageReadError, InputError, InputNotFound


def build_eval_dataset(data_cfg, what: str):
    from mmdet.datasets import build_dataset  # noqa: PLC0415

    from projects.instance_segment_anything.models.prompt_sources import load_coco_json  # noqa: PLC0415

    notes = []  # what the evaluation goes on with (printed, and counted in metrics.json)
    ann = load_coco_json(data_cfg.ann_file, warn=notes)
    prefix = Path(data_cfg.img_prefix)
    missing = [im["file_name"] for im in ann["images"] if not (prefix / im["file_name"]).is_file()]
    if missing:
        raise InputNotFound(f"{what}: {len(missing)} image(s) of {data_cfg.ann_file} are missing under "
                                f"{prefix}/, e.g. {prefix / missing[0]} (COCO images go in data/coco/, see README)")
    data_cfg = data_cfg.copy()
    data_cfg.test_mode = True
    try:
        dataset = build_dataset(data_cfg)
    except TypeError as e:  # mmcv's build_from_cfg: an argument the dataset class does not take
        if "argument" not in str(e):
            raise
        raise InputError(f"{what}: {e}") from None
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    dataset.annotation_warnings = notes
    return dataset


def image_path(dataset, idx: int) -> Path:
    info = dataset.data_infos[idx]
    return Path(dataset.img_prefix or "") / info["filename"]


def collate_one(dataset, idx: int, device: torch.device):
    """dataset[idx] (test pipeline, one augmentation) -> (img (1,3,H,W) on device, [img_meta]).

    An image that cannot be used (truncated, undecodable, gone since the dataset was built) is an
    :class:`~ptq4sam.errors.ImageReadError` naming the file, not mmdet's ``'NoneType' object has no attribute 'shape'``;
    the callers skip it with a warning and count it."""
    path = image_path(dataset, idx)
    images.check(path)  # a truncated JPEG decodes "fine" (grey) in OpenCV: look for its end marker first
    try:
        sample = dataset[idx]
    except Exception as e:  # noqa: BLE001 - mmdet's loader fails in many ways on a bad file; say which file
        images.read_rgb(path)  # raises ImageReadError if the file is the cause
        raise RuntimeError(f"loading {path} (index {idx}) failed") from e
    img = sample["img"][0] if isinstance(sample["img"], list) else sample["img"]
    metas = sample["img_metas"][0] if isinstance(sample["img_metas"], list) else sample["img_metas"]
    img = img.data if hasattr(img, "data") else img
    metas = metas.data if hasattr(metas, "data") else metas
    check_size(dataset.data_infos[idx], metas["ori_shape"], path)
    return img[None].to(device), [metas]


def check_size(info: dict, shape, path) -> None:
    """An image whose decoded size is not its annotation's ``width`` x ``height`` (a resized copy, another file
    under the same name, an EXIF rotation) would be scored against masks that do not line up: an
    :class:`~ptq4sam.errors.ImageReadError` (skipped and counted like an unreadable image). Channels need no check:
    the decoder gives 3 (grey and RGBA images are converted)."""
    h, w = shape[:2]
    if "width" in info and "height" in info and (info["height"], info["width"]) != (h, w):
        raise ImageReadError(path, f"is {w}x{h} pixels but its annotation says {info['width']}x{info['height']} "
                                   "(width x height): a resized copy or another file?")
