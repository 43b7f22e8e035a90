"""Box mAP of YOLOX-Nano on a COCO split, two ways: the official ONNX model (onnxruntime, official YOLOX
post-processing) and our converted mmdet checkpoint (mmdet's YOLOX head). The two must agree.

Also writes both detection sets as COCO results JSON, usable as cached prompts (``prompt=dict(type='json')``).

    python tools/eval_yolox_nano.py [--ann data/coco128/annotations/instances_eval96.json] [--out-dir work_dirs/yolox_nano]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from convert_yolox_nano_onnx import CONFIG, DEFAULT_ONNX, DEFAULT_OUT, letterbox  # noqa: E402

SCORE_THR, NMS_IOU = 0.01, 0.65  # mmdet yolox test_cfg (= the official val setting)


def decode_onnx(raw: np.ndarray, size: int = 416, strides=(8, 16, 32)):
    grids, st = [], []
    for s in strides:
        n = size // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        st.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(st)
    xy = (raw[:, :2] + grid) * stride
    wh = np.exp(raw[:, 2:4]) * stride
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    cls = raw[:, 5:]
    labels = cls.argmax(1)
    scores = raw[:, 4] * cls[np.arange(len(cls)), labels]
    return boxes, scores, labels


def nms_dets(boxes, scores, labels):
    from torchvision.ops import batched_nms  # noqa: PLC0415

    keep = scores >= SCORE_THR
    b, s, lab = (torch.from_numpy(a[keep]) for a in (boxes.astype(np.float32), scores.astype(np.float32), labels))
    k = batched_nms(b, s, lab, NMS_IOU)
    return b[k].numpy(), s[k].numpy(), lab[k].numpy()


def to_coco(image_id, boxes, scores, labels, cat_ids):
    return [{"image_id": int(image_id), "category_id": int(cat_ids[int(lab)]),
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(s)}
            for (x1, y1, x2, y2), s, lab in zip(boxes, scores, labels)]


def coco_box_map(ann_file: str, dets: list) -> float:
    from pycocotools.coco import COCO  # noqa: PLC0415
    from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        if not dets:
            return 0.0
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=["eval96", "calib32"], default="eval96",
                   help="bundled split; also saves the mmdet detections as data/coco128/detections/yolox_nano_<split>.json")
    p.add_argument("--ann", default=None, help="any other COCO annotation file (overrides --split)")
    p.add_argument("--img-prefix", default=str(ROOT / "data/coco128/train2017"))
    p.add_argument("--onnx", default=str(DEFAULT_ONNX))
    p.add_argument("--checkpoint", default=str(DEFAULT_OUT))
    p.add_argument("--out-dir", default=str(ROOT / "work_dirs/yolox_nano"))
    a = p.parse_args(argv)
    save_dets = None
    if a.ann is None:
        a.ann = str(ROOT / f"data/coco128/annotations/instances_{a.split}.json")
        save_dets = ROOT / "data/coco128/detections" / f"yolox_nano_{a.split}.json"
    import cv2  # noqa: PLC0415
    import mmcv  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415
    from mmcv import Config  # noqa: PLC0415
    from mmcv.runner import load_checkpoint  # noqa: PLC0415
    from mmdet.apis import inference_detector  # noqa: PLC0415
    from mmdet.models import build_detector  # noqa: PLC0415

    if not Path(a.checkpoint).is_file():
        raise SystemExit(f"{a.checkpoint} not found: run `python tools/convert_yolox_nano_onnx.py` first")
    ann = json.loads(Path(a.ann).read_text())
    cat_ids = [c["id"] for c in sorted(ann["categories"], key=lambda c: c["id"])]
    sess = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])
    cfg = Config.fromfile(str(CONFIG))
    cfg.data = dict(test=dict(pipeline=cfg.test_pipeline))
    model = build_detector(cfg.model)
    load_checkpoint(model, a.checkpoint, map_location="cpu", strict=True, logger="silent")
    model.cfg = cfg
    model.eval()
    onnx_dets, mmdet_dets = [], []
    for im in tqdm(sorted(ann["images"], key=lambda i: i["id"]), desc="yolox-nano", file=sys.stdout):
        path = str(Path(a.img_prefix) / im["file_name"])
        img = cv2.imread(path)
        # same resize rounding as mmdet's pipeline (mmcv.imrescale), then the official 114-padding letterbox
        resized = mmcv.imrescale(img, (416, 416), interpolation="bilinear")
        sx, sy = resized.shape[1] / img.shape[1], resized.shape[0] / img.shape[0]
        raw = sess.run(None, {sess.get_inputs()[0].name: letterbox(resized)})[0][0]
        boxes, scores, labels = decode_onnx(raw)
        b, s, lab = nms_dets(boxes / np.array([sx, sy, sx, sy], np.float32), scores, labels)
        onnx_dets += to_coco(im["id"], b, s, lab, cat_ids)
        with torch.no_grad():
            res = inference_detector(model, path)
        for c, dets in enumerate(res):
            mmdet_dets += to_coco(im["id"], dets[:, :4], dets[:, 4], [c] * len(dets), cat_ids)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"ann_file": a.ann, "images": len(ann["images"]), "score_thr": SCORE_THR, "nms_iou": NMS_IOU,
               "onnx_bbox_mAP": coco_box_map(a.ann, onnx_dets), "mmdet_bbox_mAP": coco_box_map(a.ann, mmdet_dets)}
    (out / "onnx_dets.json").write_text(json.dumps(onnx_dets))
    (out / "mmdet_dets.json").write_text(json.dumps(mmdet_dets))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if save_dets is not None:  # cached prompts for the torch-only benchmarks (prompt=dict(type='json'))
        save_dets.parent.mkdir(parents=True, exist_ok=True)
        save_dets.write_text(json.dumps([{**d, "bbox": [round(v, 2) for v in d["bbox"]], "score": round(d["score"], 5)}
                                         for d in mmdet_dets]))
        print(f"wrote {save_dets}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
