"""tools/score_split.py: a quantized model's mask-mAP change split into its masks and its scores (hand-made COCO)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from pycocotools import mask as mask_utils

from ptq4sam import coco_eval
from ptq4sam.errors import InputError

H = W = 20


def _square(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _ann(tmp_path):
    boxes = {(1, 0): (0, 0, 10, 10), (1, 1): (10, 10, 20, 20), (2, 0): (2, 2, 12, 12)}
    anns = [{"id": k, "image_id": img, "category_id": 1, "iscrowd": 0, "area": 100.0,
             "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
            for k, ((img, _), (x0, y0, x1, y1)) in enumerate(boxes.items(), 1)]
    ann = {"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"} for i in (1, 2)],
           "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return path, boxes


def _pred(boxes, masks, scores):
    res = []
    for (key, (x0, y0, x1, y1)), m, s in zip(boxes.items(), masks, scores):
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        res.append({"image_id": key[0], "prompt_index": key[1], "category_id": 1, "score": s, "sam_iou": s,
                    "segmentation": rle, "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return {"image_ids": [1, 2], "results": res}


def test_score_split_separates_masks_from_scores(tmp_path):
    path, boxes = _ann(tmp_path)
    exact = [_square(*b) for b in boxes.values()]
    half = [_square(0, 0, 10, 5), _square(10, 10, 20, 20), _square(2, 2, 12, 7)]  # IoU with GT: 0.5, 1, 0.5
    fp = _pred(boxes, half, [0.9, 0.8, 0.7])

    same = coco_eval.score_split(path, fp, fp)
    m = same["segm_mAP"]
    assert m["fp"] == m["q"] == m["q_masks_fp_scores"] == m["fp_masks_q_scores"]
    assert same["mask_iou_q_vs_fp_mean"] == 1.0 and same["sam_iou_abs_diff_mean"] == 0.0
    assert same["sam_iou_rank_corr_q_vs_fp"] == pytest.approx(1.0)
    assert same["mask_iou_to_gt_mean"]["fp"] == pytest.approx(2 / 3)  # (0.5 + 1 + 0.5) / 3

    # same masks, scores that rank the perfect mask last: only the scores changed
    q = _pred(boxes, half, [0.9, 0.1, 0.7])
    s = coco_eval.score_split(path, fp, q)
    assert s["segm_mAP"]["q_masks_fp_scores"] == s["segm_mAP"]["fp"]
    assert s["segm_mAP"]["fp_masks_q_scores"] == s["segm_mAP"]["q"]
    assert s["segm_mAP"]["q"] < s["segm_mAP"]["fp"]
    assert s["sam_iou_abs_diff_mean"] == pytest.approx(0.7 / 3)
    # FP's score puts the perfect mask in the middle, q's last: rank correlations with the masks' IoU with GT
    iou_rank = np.argsort(np.argsort([0.5, 1.0, 0.5], kind="stable"))
    for name, sc in (("fp", [0.9, 0.8, 0.7]), ("q", [0.9, 0.1, 0.7])):
        ref = np.corrcoef(np.argsort(np.argsort(sc)), iou_rank)[0, 1]
        assert s["score_rank_corr_with_mask_iou"][name] == pytest.approx(ref)

    # same scores, exact masks: only the masks changed
    q = _pred(boxes, exact, [0.9, 0.8, 0.7])
    s = coco_eval.score_split(path, fp, q)
    assert s["segm_mAP"]["q"] == 1.0 and s["segm_mAP"]["q_masks_fp_scores"] == 1.0
    assert s["segm_mAP"]["fp_masks_q_scores"] == s["segm_mAP"]["fp"] < 1.0
    assert s["mask_iou_to_gt_mean"] == {"fp": pytest.approx(2 / 3), "q": 1.0}
    assert s["mask_iou_q_vs_fp_mean"] == pytest.approx(2 / 3)

    # the tool writes the same numbers
    (tmp_path / "fp.json").write_text(json.dumps(fp))
    (tmp_path / "q.json").write_text(json.dumps(q))
    r = subprocess.run([sys.executable, "tools/score_split.py", "--ann", str(path), "--fp", str(tmp_path / "fp.json"),
                        "--q", str(tmp_path / "q.json"), "--out", str(tmp_path / "split.json")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "split.json").read_text())["runs"][f"{tmp_path.name}/q"]["segm_mAP"] == s["segm_mAP"]


def test_score_split_refuses_other_prompts_and_skips_gt_iou_for_detector_boxes(tmp_path):
    path, boxes = _ann(tmp_path)
    masks = [_square(*b) for b in boxes.values()]
    fp = _pred(boxes, masks, [0.9, 0.8, 0.7])
    fewer = {"image_ids": [1, 2], "results": fp["results"][:2]}
    with pytest.raises(InputError, match="different images or prompts"):
        coco_eval.score_split(path, fp, fewer)
    old = {"image_ids": [1, 2], "results": [{k: v for k, v in r.items() if k != "sam_iou"} for r in fp["results"]]}
    with pytest.raises(InputError, match="sam_iou"):
        coco_eval.score_split(path, old, fp)
    moved = {**boxes, (1, 0): (1, 0, 10, 10)}  # not the GT box: no IoU with "its" GT instance
    det = _pred(moved, masks, [0.9, 0.8, 0.7])
    s = coco_eval.score_split(path, det, det)
    assert "mask_iou_to_gt_mean" not in s and s["segm_mAP"]["q"] == s["segm_mAP"]["fp"]


def test_score_split_counts_masks_above_aps_thresholds(tmp_path):
    path, boxes = _ann(tmp_path)
    masks = [_square(0, 0, 10, 5), _square(10, 10, 20, 20), _square(0, 0, 1, 1)]  # IoU with GT 0.5, 1, 0
    s = coco_eval.score_split(path, _pred(boxes, masks, [0.9, 0.8, 0.7]), _pred(boxes, masks, [0.9, 0.8, 0.7]))
    assert s["mask_iou_to_gt_share"]["q"] == {"0.5": pytest.approx(2 / 3), "0.75": pytest.approx(1 / 3),
                                              "<0.1": pytest.approx(1 / 3)}


def _dup_first_image(tmp_path, boxes, pred):
    """The hand-made split with image 1 twice (the copy as image 3): the split a bootstrap draw [1, 1] stands for."""
    ann = json.loads((tmp_path / "ann.json").read_text())
    ann["images"] = [ann["images"][0], dict(ann["images"][0], id=3)]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] == 1]
    ann["annotations"] += [dict(a, id=a["id"] + 10, image_id=3) for a in ann["annotations"]]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(ann))
    res = [r for r in pred["results"] if r["image_id"] == 1]
    return path, res + [dict(r, image_id=3) for r in res], [1, 3]


def test_bootstrap_resamples_images_exactly_and_pairs_models(tmp_path):
    path, boxes = _ann(tmp_path)
    exact = _pred(boxes, [_square(*b) for b in boxes.values()], [0.9, 0.8, 0.7])
    half = _pred(boxes, [_square(0, 0, 10, 5), _square(10, 10, 20, 20), _square(2, 2, 12, 7)], [0.9, 0.8, 0.7])
    b = coco_eval.bootstrap_map(path, [half, exact, half], samples=50, seed=3)
    # on the split itself: COCOeval's own number
    assert round(b["full"][0], 4) == coco_eval.coco_metrics(path, half["results"], [1, 2], ("segm",))["segm_mAP"]
    assert b["full"][1] == 1.0 and b["samples"].shape == (50, 3) and b["images"] == 2
    # the same model twice: the same number in every resample; the exact masks are better in every resample
    assert np.array_equal(b["samples"][:, 0], b["samples"][:, 2])
    assert np.all(b["samples"][:, 1] == 1.0) and np.all(b["samples"][:, 0] < 1.0)
    # a draw with image 1 twice = COCOeval on a split holding image 1 and an exact copy of it
    ev = coco_eval._per_image_eval(path, half["results"], [1, 2])
    got = coco_eval.ResampledMAP(ev)(np.array([2.0, 0.0]))
    dpath, dres, dids = _dup_first_image(tmp_path, boxes, half)
    assert round(got, 4) == coco_eval.coco_metrics(dpath, dres, dids, ("segm",))["segm_mAP"]
    with pytest.raises(InputError, match="other images"):
        coco_eval.bootstrap_map(path, [half, {"image_ids": [1], "results": half["results"][:2]}])

    # the tool: differences against --ref, their interval, and the share of resamples at least as good
    for name, d in (("half", half), ("exact", exact)):
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    import gzip

    (tmp_path / "half.json.gz").write_bytes(gzip.compress(json.dumps(half).encode()))
    assert coco_eval.load_predictions(tmp_path / "half.json.gz") == half
    (tmp_path / "trunc.json.gz").write_bytes(gzip.compress(json.dumps(half).encode())[:50])
    with pytest.raises(InputError, match="trunc.json.gz: not JSON"):
        coco_eval.load_predictions(tmp_path / "trunc.json.gz")
    r = subprocess.run([sys.executable, "tools/compare_predictions.py", "--ann", str(path), "--ref",
                        str(tmp_path / "half.json"), "--q", str(tmp_path / "exact.json"), "--fp",
                        str(tmp_path / "exact.json"), "--samples", "50", "--seed", "3", "--out",
                        str(tmp_path / "cmp.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    ref, ex = rows[0], rows[1]
    assert ref["diff_vs_ref"] == 0 and ref["diff_ci"] == [0, 0] and ref["share_at_least_ref"] == 1.0
    assert ex["segm_mAP"] == 1.0 and ex["pct_of_fp"] == 100.0 and ex["share_at_least_ref"] == 1.0
    assert ex["diff_vs_ref"] == round(1.0 - b["full"][0], 4) and ex["diff_ci"][0] > 0
    r = subprocess.run([sys.executable, "tools/compare_predictions.py", "--ref", str(tmp_path / "nope.json"), "--q",
                        str(tmp_path / "exact.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "nope.json" in r.stderr


def test_resampled_map_equals_cocoeval_on_the_duplicated_split_with_tied_scores(tmp_path):
    """On real predictions with many tied scores (a quantized IoU head): the weighted resample equals COCOeval run on
    a split that holds each drawn image as often as drawn (copies next to their original)."""
    ann = json.loads((ROOT / "data/coco128/annotations/instances_eval96.json").read_text())
    pred = coco_eval.load_predictions(
        ROOT / "docs/results/deploy_w8a8_gptq/predictions/ORT_quantize_static_W8A8__MinMax__ort.json.gz")
    assert len({r["score"] for r in pred["results"]}) < len(pred["results"]) / 2  # ties
    ids = sorted(pred["image_ids"])[:20]
    pred = {"image_ids": ids, "results": [r for r in pred["results"] if r["image_id"] in ids]}
    sub = dict(ann, images=[im for im in ann["images"] if im["id"] in ids],
               annotations=[a for a in ann["annotations"] if a["image_id"] in ids])
    (tmp_path / "sub.json").write_text(json.dumps(sub))
    ev = coco_eval._per_image_eval(tmp_path / "sub.json", pred["results"], ids)
    rm = coco_eval.ResampledMAP(ev)
    rng = np.random.default_rng(0)
    for _ in range(3):
        w = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
        images, anns, res, new = [], [], [], 0
        for pos, img in enumerate(ids):  # the drawn split, copies adjacent, ids renumbered in that order
            for _ in range(w[pos]):
                new += 1
                im = next(i for i in sub["images"] if i["id"] == img)
                images.append(dict(im, id=new))
                for a in sub["annotations"]:
                    if a["image_id"] == img:
                        anns.append(dict(a, image_id=new, id=len(anns) + 1))
                res += [dict(r, image_id=new) for r in pred["results"] if r["image_id"] == img]
        (tmp_path / "dup.json").write_text(json.dumps(dict(sub, images=images, annotations=anns)))
        ref = coco_eval._per_image_eval(tmp_path / "dup.json", res, list(range(1, new + 1)))
        ref.accumulate()
        p = ref.eval["precision"][:, :, :, 0, -1]
        assert rm(w.astype(float)) == pytest.approx(float(np.mean(p[p > -1])), abs=1e-12)
