"""Torch-only COCO evaluation of a BoxPromptSegmenter (no mmcv/mmdet): GT or cached-detection prompts ->
masks -> pycocotools segm / bbox mAP. Used by the benchmarks, which must also run on machines without mmcv.
Gives the same numbers as the mmdet pipeline (tested)."""
from __future__ import annotations

import contextlib
import gzip
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


def _gt_instances(ann: dict) -> Dict[int, List[dict]]:
    """Per image id, the annotations that become GT-box prompts (not crowd, box at least 1 px each way), in order."""
    per = defaultdict(list)
    for a in ann["annotations"]:
        if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1:
            per[a["image_id"]].append(a)
    return per


def gt_prompts(ann: dict) -> Dict[int, Prompt]:
    per = _gt_instances(ann)
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
        sam_iou = out.iou.numpy()
        final = scores * sam_iou if use_sam_iou else scores
        rles = encode_masks(out.masks)
        for i, (b, s, c, rle, iou) in enumerate(zip(boxes, final, cats, rles, sam_iou.reshape(-1))):
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": im["id"], "category_id": int(c), "score": float(s), "segmentation": rle,
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                            "prompt_index": i, "sam_iou": float(iou)})
    return results


def save_predictions_file(path, image_ids: List[int], results: List[dict]) -> None:
    """Predictions as :func:`load_predictions` reads them (gzipped when the name ends in ``.gz``), written atomically."""
    from .errors import atomic_write  # noqa: PLC0415

    raw = json.dumps({"image_ids": list(image_ids), "results": results}).encode()
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw))


def load_predictions(path) -> dict:
    """Predictions written by :func:`evaluate` (``save_predictions``; the benchmarks' ``--save-predictions``), as
    JSON or gzipped JSON (``.gz``)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"predictions file not found: {path}")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        d = json.loads(raw)
    except (json.JSONDecodeError, OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict) or "results" not in d or "image_ids" not in d:
        raise InputError(f"{path}: expected predictions written with --save-predictions (keys 'image_ids' and "
                         "'results')")
    return d


def _evaluated(gt, results: List[dict], image_ids: List[int], iou_type: str):
    """COCOeval of ``results`` on ``gt`` after ``evaluate()`` (per-(category, area, image) matches, not accumulated),
    with mmdet's CocoDataset.evaluate settings."""
    from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    ev.params.imgIds = list(image_ids)
    ev.params.maxDets = [100, 300, 1000]  # as mmdet's CocoDataset.evaluate
    ev.evaluate()
    return ev


def coco_metrics(ann_file, results: List[dict], image_ids: List[int],
                 iou_types=("segm", "bbox")) -> Dict[str, float]:
    from pycocotools.coco import COCO  # noqa: PLC0415

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        for iou_type in iou_types:
            if not results:
                out.update({f"{iou_type}_mAP": 0.0, f"{iou_type}_mAP_50": 0.0, f"{iou_type}_mAP_75": 0.0})
                continue
            ev = _evaluated(gt, results, image_ids, iou_type)
            ev.accumulate()
            ev.summarize()
            out.update({f"{iou_type}_mAP": round(float(ev.stats[0]), 4), f"{iou_type}_mAP_50": round(float(ev.stats[1]), 4),
                        f"{iou_type}_mAP_75": round(float(ev.stats[2]), 4)})
    return out


def evaluate(seg, ann_file, img_dir, prompts, use_sam_iou=True, max_images=None, desc="eval",
             save_predictions=None) -> Dict[str, float]:
    """COCO metrics of ``seg`` on ``ann_file``; ``save_predictions``: also write the results (RLE masks, scores,
    ``prompt_index``, ``sam_iou``) to this JSON file, for :func:`score_split`."""
    ann = load_ann(ann_file)
    res = predict(seg, ann, img_dir, prompts, use_sam_iou, max_images, desc)
    ids = [im["id"] for im in first_images(ann, max_images)]
    if save_predictions:
        save_predictions_file(save_predictions, ids, res)
    return {**coco_metrics(ann_file, res, ids), "num_images": len(ids)}


def _rank_corr(a, b) -> float:
    """Spearman's rank correlation (ties broken by position; the scores are floats)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a, kind="stable")), np.argsort(np.argsort(b, kind="stable"))
    return float(np.corrcoef(ra, rb)[0, 1])


def _by_prompt(pred: dict, name: str) -> Dict[Tuple[int, int], dict]:
    out = {}
    for r in pred["results"]:
        if "prompt_index" not in r or "sam_iou" not in r:
            raise InputError(f"{name}: prediction without 'prompt_index' / 'sam_iou' (written before they were "
                             "recorded? save it again with --save-predictions)")
        out[(r["image_id"], r["prompt_index"])] = r
    return out


def _rle(result: dict) -> dict:
    """A result's RLE as pycocotools takes it (saved predictions hold its counts as str)."""
    s = result["segmentation"]
    return dict(s, counts=s["counts"].encode()) if isinstance(s["counts"], str) else s


def mask_iou_to_gt(ann: dict, results: Dict[Tuple[int, int], dict]) -> Optional[Dict[Tuple[int, int], float]]:
    """IoU of each predicted mask with the GT instance whose box prompted it, or None when the prompts were not the
    GT boxes (:func:`gt_prompts`' order and filter; a box that differs by more than 0.01 px means other prompts)."""
    from pycocotools import mask as mask_utils  # noqa: PLC0415

    per = _gt_instances(ann)
    size = {im["id"]: (im["height"], im["width"]) for im in ann["images"]}
    out = {}
    for (img, i), r in results.items():
        gts = per.get(img, [])
        if i >= len(gts) or not np.allclose(gts[i]["bbox"], r["bbox"], atol=0.01):
            return None
        seg, (h, w) = gts[i]["segmentation"], size[img]
        if isinstance(seg, list):  # polygons
            gt = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            gt = mask_utils.frPyObjects(seg, h, w)
        else:
            gt = seg
        out[(img, i)] = float(mask_utils.iou([_rle(r)], [gt], [0])[0, 0])
    return out


def score_split(ann_file, fp: dict, q: dict, fp_name="fp", q_name="q") -> Dict[str, object]:
    """Split a model's mask-mAP change against FP into its masks and its scores.

    ``fp`` / ``q``: predictions written by :func:`evaluate` (``save_predictions``) on the same images and prompts.
    mAP is recomputed with each model's masks under each model's scores (the score ranks the masks across images; with
    GT boxes it is SAM's predicted IoU): ``q_masks_fp_scores`` is the quantized masks ranked as the FP model ranked
    its own, so ``fp - q_masks_fp_scores`` is what the masks lose and ``q_masks_fp_scores - q`` what the scores add on
    top. With GT-box prompts also each mask's IoU with its own GT instance (mask quality without any ranking), and how
    well each model's score ranks its masks by that IoU (Spearman)."""
    a, b = _by_prompt(fp, fp_name), _by_prompt(q, q_name)
    if set(a) != set(b) or fp["image_ids"] != q["image_ids"]:
        raise InputError(f"{fp_name} and {q_name} are predictions on different images or prompts "
                         f"({len(a)} vs {len(b)} prompts, {len(fp['image_ids'])} vs {len(q['image_ids'])} images)")
    keys = sorted(a)
    ids = fp["image_ids"]

    def segm(masks, scores):
        res = [dict(masks[k], score=scores[k]["score"]) for k in keys]
        return coco_metrics(ann_file, res, ids, iou_types=("segm",))["segm_mAP"]

    out: Dict[str, object] = {"prompts": len(keys), "images": len(ids), "segm_mAP": {
        "fp": segm(a, a), "q": segm(b, b), "q_masks_fp_scores": segm(b, a), "fp_masks_q_scores": segm(a, b)}}
    ann = load_ann(ann_file)
    ious = {n: mask_iou_to_gt(ann, {k: d[k] for k in keys}) for n, d in (("fp", a), ("q", b))}
    from pycocotools import mask as mask_utils  # noqa: PLC0415

    out["mask_iou_q_vs_fp_mean"] = float(np.mean([mask_utils.iou([_rle(b[k])], [_rle(a[k])], [0])[0, 0] for k in keys]))
    sa, sb = [a[k]["sam_iou"] for k in keys], [b[k]["sam_iou"] for k in keys]
    out["sam_iou_abs_diff_mean"] = float(np.mean(np.abs(np.subtract(sa, sb))))
    out["sam_iou_rank_corr_q_vs_fp"] = _rank_corr(sa, sb)
    if ious["fp"] is not None and ious["q"] is not None:
        out["mask_iou_to_gt_mean"] = {n: float(np.mean(list(v.values()))) for n, v in ious.items()}
        # what AP counts: the share of masks above its IoU thresholds, and of failures
        out["mask_iou_to_gt_share"] = {n: {f"{t}": float(np.mean([x >= t for x in v.values()])) for t in (0.5, 0.75)}
                                       | {"<0.1": float(np.mean([x < 0.1 for x in v.values()]))}
                                       for n, v in ious.items()}
        out["score_rank_corr_with_mask_iou"] = {n: _rank_corr([d[k]["score"] for k in keys], [ious[n][k] for k in keys])
                                                for n, d in (("fp", a), ("q", b))}
    return out


def _per_image_eval(ann_file, results: List[dict], image_ids: List[int]):
    """Mask COCOeval of ``results`` after ``evaluate()`` (:func:`_evaluated`), quietly."""
    from pycocotools.coco import COCO  # noqa: PLC0415

    with contextlib.redirect_stdout(io.StringIO()):
        return _evaluated(COCO(str(ann_file)), results, image_ids, "segm")


def bootstrap_map(ann_file, preds: List[dict], samples: int = 1000, seed: int = 0) -> Dict[str, object]:
    """Paired bootstrap over images of mask mAP: each sample draws len(images) images with replacement (the same
    draw for every model) and recomputes every model's mAP on it. ``preds``: predictions written by :func:`evaluate`
    (``save_predictions``) on the same images. Returns ``full`` (each model's mAP on the split itself, equal to
    :func:`coco_metrics`' ``segm_mAP`` before rounding) and ``samples`` (samples x models). A repeated image counts as
    that many distinct images (:class:`ResampledMAP`)."""
    if not preds:
        raise InputError("bootstrap_map: no predictions given")
    ids = list(preds[0]["image_ids"])
    for i, p in enumerate(preds[1:], 1):
        if sorted(p["image_ids"]) != sorted(ids):
            raise InputError(f"bootstrap_map: predictions {i} are on other images than predictions 0 "
                             f"({len(p['image_ids'])} vs {len(ids)} images); a paired bootstrap needs the same split")
    if samples < 1:
        raise InputError(f"bootstrap_map: samples must be >= 1, got {samples}")
    n_img = len(ids)
    full = resampled_maps(ann_file, preds, np.ones((1, n_img)))[0].tolist()
    out = resampled_maps(ann_file, preds, bootstrap_draws(n_img, samples, seed))
    return {"full": full, "samples": out, "images": n_img}


class ResampledMAP:
    """Mask mAP (IoU .50:.95, area 'all', 1000 detections: COCOeval's ``stats[0]``) of one model's predictions on any
    resample of the split's images, from COCOeval's per-image matches computed once.

    A resample is a vector of image multiplicities; a repeated image counts as that many distinct images: the result
    is COCOeval's on a split that holds each image as often as drawn, the copies next to their original (its
    accumulation, redone here on arrays: the detections of every copy in image order, stably sorted by score, so
    tied scores are ordered as COCOeval orders them)."""

    def __init__(self, ev):
        p = ev._paramsEval
        self.n_img, self.rec_thrs = len(p.imgIds), np.asarray(p.recThrs)
        n_area, max_det = len(p.areaRng), p.maxDets[-1]
        self.n_thr = len(p.iouThrs)
        self.cats = []  # per category with a GT or a detection: (score, image, tp (T, D), fp (T, D), GT per image)
        for k in range(len(p.catIds)):
            es = [ev.evalImgs[(k * n_area) * self.n_img + i] for i in range(self.n_img)]  # area 'all' is index 0
            if all(e is None for e in es):
                continue
            gt = np.array([0 if e is None else int(np.sum(np.asarray(e["gtIgnore"]) == 0)) for e in es], np.float64)
            scores, imgs, tps, fps = [], [], [], []
            for i, e in enumerate(es):
                if e is None or not len(e["dtScores"]):
                    continue
                m, ig = np.asarray(e["dtMatches"])[:, :max_det], np.asarray(e["dtIgnore"])[:, :max_det].astype(bool)
                scores.append(np.asarray(e["dtScores"][:max_det], np.float64))
                imgs.append(np.full(m.shape[1], i))
                tps.append((m != 0) & ~ig)
                fps.append((m == 0) & ~ig)
            if scores:
                self.cats.append((np.concatenate(scores), np.concatenate(imgs), np.concatenate(tps, 1),
                                  np.concatenate(fps, 1), gt))
            else:
                self.cats.append((np.zeros(0), np.zeros(0, np.int64), np.zeros((self.n_thr, 0), bool),
                                  np.zeros((self.n_thr, 0), bool), gt))

    def __call__(self, weights: np.ndarray) -> float:
        """mAP of the resample with image multiplicities ``weights`` (n_img,); -1 if no category has a GT."""
        w_int = np.asarray(weights).astype(np.int64)
        aps = []
        for score, img, tp, fp, gt in self.cats:
            npig = float(w_int @ gt)
            if npig == 0:
                continue  # COCOeval: -1, left out of the mean
            rep = w_int[img]
            if not rep.sum():
                aps.append(np.zeros(self.n_thr))
                continue
            j = np.repeat(np.arange(len(score)), rep)  # every copy of every detection
            start = np.repeat(np.cumsum(rep) - rep, rep)
            copy = np.arange(len(j)) - start
            # COCOeval: detections concatenated image by image (each copy of an image in turn), then a stable sort
            # by descending score
            order = np.lexsort((j, copy, img[j], -score[j]))
            jj = j[order]
            tp_sum, fp_sum = np.cumsum(tp[:, jj], 1, dtype=np.float64), np.cumsum(fp[:, jj], 1, dtype=np.float64)
            rc = tp_sum / npig
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
            ap = np.zeros(self.n_thr)
            for t in range(self.n_thr):
                inds = np.searchsorted(rc[t], self.rec_thrs, side="left")
                ok = inds < rc.shape[1]
                ap[t] = np.where(ok, pr[t, np.minimum(inds, rc.shape[1] - 1)], 0.0).mean()
            aps.append(ap)
        return float(np.mean(np.concatenate(aps))) if aps else -1.0


def resampled_maps(ann_file, preds: List[dict], draws: np.ndarray) -> np.ndarray:
    """(draws, models) mask mAP of each model on each resample; ``draws``: (S, n_img) image multiplicities of the
    sorted image ids. Each model's per-image matching runs once (:class:`ResampledMAP`)."""
    out = np.empty((draws.shape[0], len(preds)))
    for j, p in enumerate(preds):
        rm = ResampledMAP(_per_image_eval(ann_file, p["results"], list(p["image_ids"])))
        for s in range(draws.shape[0]):
            out[s, j] = rm(draws[s])
    return out


def bootstrap_draws(n_img: int, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, n_img) multiplicities of ``samples`` draws of n_img images with replacement (seeded): the same draws
    pair every model compared on the split."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_img, n_img), minlength=n_img) for _ in range(samples)]).astype(
        np.float64)
