"""Checks of a COCO annotation file before any work (torch-free, mmcv-free).

What the toolkit relies on is checked once, when the file is read: the three lists, ids (integers, unique, every
annotation's image and category known), file names (unique by base name: prompts are looked up by it), image sizes
(positive integers), boxes (four finite numbers, no negative size) and masks (polygons of at least three points, or
RLE whose size is its image's). A structural problem is an :class:`~ptq4sam.errors.InputError` naming the file, the
entry and the value; what the evaluation can go on with honestly (a box reaching past its image) is returned as a
warning line, printed by the caller and counted in ``metrics.json``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from .errors import InputError, is_int, is_number, short_repr

_SLACK = 1.0  # pixels a box may reach past its image (COCO's own boxes do by rounding)


def _check_mask(seg, i: int, a: dict, size, where: str) -> None:
    if isinstance(seg, list):
        for poly in seg:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(is_number(v) for v in poly)):
                raise InputError(f"{where} annotation {i} (id {a['id']}): 'segmentation' polygons must be lists of "
                                 f"x, y numbers (at least 3 points), got {short_repr(poly)}")
    elif isinstance(seg, dict):
        if "counts" not in seg or not isinstance(seg["counts"], (str, list)):
            raise InputError(f"{where} annotation {i} (id {a['id']}): RLE 'segmentation' needs 'counts' (a string "
                             f"or a list), got {short_repr(seg)}")
        if seg.get("size") != list(size):
            raise InputError(f"{where} annotation {i} (id {a['id']}): RLE size {seg.get('size')!r} is not its "
                             f"image's [height, width] {list(size)}")
    else:
        raise InputError(f"{where} annotation {i} (id {a['id']}): 'segmentation' must be a list of polygons or an "
                         f"RLE object, got {short_repr(seg)}")


def _entries(items: list, what: str, where: str):
    """(index, entry) of a COCO list whose entries must be objects with an integer ``id``, each id once."""
    seen = set()
    for i, e in enumerate(items):
        if not isinstance(e, dict) or not is_int(e.get("id")):
            raise InputError(f"{where}: {what} {i} must be an object with an integer 'id', got {short_repr(e)}")
        if e["id"] in seen:
            raise InputError(f"{where}: {what} id {e['id']} appears twice")
        seen.add(e["id"])
        yield i, e


def check_coco(ann: Any, where: str) -> List[str]:
    """Raise :class:`InputError` for a structural problem of the COCO dict ``ann`` (read from ``where``); return
    warning lines for what can be used as it is."""
    if not isinstance(ann, dict):
        raise InputError(f"{where}: a COCO annotation file is an object with 'images', 'annotations' and "
                         f"'categories', got {type(ann).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in ann or not isinstance(ann[key], list):
            raise InputError(f"{where}: COCO annotation file has no '{key}' list (keys: {sorted(map(str, ann))})")
    if not ann["categories"]:
        raise InputError(f"{where}: 'categories' is empty")
    cats = {c["id"] for _, c in _entries(ann["categories"], "category", where)}
    sizes: Dict[int, tuple] = {}
    names: Dict[str, int] = {}
    for i, im in _entries(ann["images"], "image", where):
        name = im.get("file_name")
        if not isinstance(name, str) or not os.path.basename(name):
            raise InputError(f"{where}: image {i} (id {im['id']}): 'file_name' must be a file name, got {name!r}")
        h, w = im.get("height"), im.get("width")
        if not (is_int(h) and is_int(w) and h > 0 and w > 0):
            raise InputError(f"{where}: image {i} (id {im['id']}, {name}): 'width' and 'height' must be positive "
                             f"integers (pixels), got width={w!r} height={h!r}")
        base = os.path.basename(name)
        if base in names:  # prompts and results are matched to images by base name
            raise InputError(f"{where}: images {names[base]} and {im['id']} share the file name {base}")
        sizes[im["id"]], names[base] = (h, w), im["id"]
    outside = 0
    for i, a in _entries(ann["annotations"], "annotation", where):
        if not is_int(a.get("image_id")) or a["image_id"] not in sizes:
            raise InputError(f"{where}: annotation {i} (id {a['id']}): image_id {a.get('image_id')!r} is not an "
                             "image of the file")
        if not is_int(a.get("category_id")) or a["category_id"] not in cats:
            raise InputError(f"{where}: annotation {i} (id {a['id']}): category_id {a.get('category_id')!r} is not "
                             f"a category of the file")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)) or box[2] < 0 or box[3] < 0:
            raise InputError(f"{where}: annotation {i} (id {a['id']}): 'bbox' must be 4 finite numbers [x, y, w, h] "
                             f"with w, h >= 0, got {short_repr(box)}")
        if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd"), float):
            raise InputError(f"{where}: annotation {i} (id {a['id']}): 'iscrowd' must be 0 or 1, got "
                             f"{a.get('iscrowd')!r}")
        if "area" in a and not (is_number(a["area"]) and a["area"] >= 0):
            raise InputError(f"{where}: annotation {i} (id {a['id']}): 'area' must be a number >= 0, got "
                             f"{a['area']!r}")
        h, w = sizes[a["image_id"]]
        if "segmentation" in a:
            _check_mask(a["segmentation"], i, a, (h, w), where)
        x, y, bw, bh = box
        if x < -_SLACK or y < -_SLACK or x + bw > w + _SLACK or y + bh > h + _SLACK:
            outside += 1
    warnings = []
    if outside:
        warnings.append(f"{where}: {outside} annotation box(es) reach more than {_SLACK:g} pixel past their image "
                        "(kept as they are)")
    return warnings
