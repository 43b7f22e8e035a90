"""Bad inputs and faults (docs/reliability.md): each row of the table there is pinned by a case here.

CLI cases run the real ``test_quant.py`` entry (``runner.main``) in process: a known input error is one line on stderr
and exit status 2, naming the file / key / value; handled cases (unreadable images, odd prompt boxes) warn and count.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import CALIB_ANN, DATA, EVAL_ANN, calib_samples, needs_mmdet

from ptq4sam.deploy import COMPACT_FORMAT
from ptq4sam.errors import InputError, UserError, atomic_write, atomic_write_text, command_line
from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.qconfig import load_qconfig

GT_CFG = "projects/configs/lite_medsam/gt-box_lite-medsam.py"
YOLO_CFG = "projects/configs/lite_medsam/yolox-nano_lite-medsam.py"
Q66 = "exp/demo/config66.yaml"
IMG = DATA / "train2017"


def _ann(n=2, split=EVAL_ANN):
    """The n images of a split with the fewest annotations (cheap to evaluate), by id."""
    ann = json.loads(split.read_text())
    count = {i["id"]: 0 for i in ann["images"]}
    for a in ann["annotations"]:
        count[a["image_id"]] += 1
    ims = sorted(sorted(ann["images"], key=lambda i: (count[i["id"]] == 0, count[i["id"]], i["id"]))[:n],
                 key=lambda i: i["id"])
    ids = {i["id"] for i in ims}
    return {"images": ims, "annotations": [a for a in ann["annotations"] if a["image_id"] in ids],
            "categories": ann["categories"]}


def _split_with_bad_image(tmp, how: str, n=2, split=EVAL_ANN):
    """A copy of the first n images of a split (own folder) whose first image is made unusable ``how``."""
    ann = _ann(n, split)
    folder = tmp / "imgs"
    folder.mkdir(exist_ok=True)
    for im in ann["images"]:
        shutil.copy(IMG / im["file_name"], folder / im["file_name"])
    bad = folder / ann["images"][0]["file_name"]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if how == "truncated" else b"this is not a JPEG")
    (tmp / "ann.json").write_text(json.dumps(ann))
    return tmp / "ann.json", folder, bad


def _main(argv, capsys):
    from ptq4sam.solver.runner import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage error (exit status 2)
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- the table: input errors through the CLI ------------------------------------------------------------------------
def _case(tmp, name):
    """argv for one bad-input row, and the substrings its one-line error must contain."""
    base = ["--config", GT_CFG, "--fp", "--work-dir", str(tmp / "w"), "--max-images", "1"]
    q = ["--config", GT_CFG, "--q_config", Q66, "--work-dir", str(tmp / "w"), "--max-images", "1"]
    if name == "config_missing":
        return ["--config", "projects/configs/nope.py", "--fp"], ["config not found", "nope.py"]
    if name == "config_not_python":
        f = tmp / "bad_cfg.py"
        f.write_text("model = dict(type='DetWrapperInstanceSAM',\n")
        return ["--config", str(f), "--fp"], ["bad_cfg.py", "line", "not valid Python"]
    if name == "cfg_option_unknown_key":
        return base + ["--cfg-options", "data.test.ann_fil=x.json"], ["data.test.ann_fil", "did you mean ann_file"]
    if name == "cfg_option_bad_argument":
        return base + ["--cfg-options", "model.use_sam_iouu=False"], ["model.use_sam_iouu", "use_sam_iou"]
    if name == "annotation_without_categories":
        f = tmp / "nocat.json"
        f.write_text(json.dumps({"images": _ann(1)["images"], "annotations": []}))
        return base + ["--cfg-options", f"data.test.ann_file={f}"], ["nocat.json", "categories"]
    if name == "annotation_not_json":
        f = tmp / "broken.json"
        f.write_text('{"images": [')
        return base + ["--cfg-options", f"data.test.ann_file={f}"], ["broken.json", "not valid JSON"]
    if name == "empty_dataset":
        f = tmp / "empty.json"
        f.write_text(json.dumps({**_ann(0), "images": []}))
        return base + ["--cfg-options", f"data.test.ann_file={f}"], ["empty.json", "no images"]
    if name == "image_listed_but_missing":
        return base + ["--cfg-options", f"data.test.img_prefix={tmp}/nowhere/"], ["missing", "nowhere"]
    if name == "detector_checkpoint_missing":
        return ["--config", "projects/configs/yolox/yolo_l-sam-vit-b.py", "--fp", "--work-dir", str(tmp / "w"),
                "--cfg-options", f"data.test.ann_file={EVAL_ANN}", f"data.test.img_prefix={IMG}/"], [
            "yolox_l_8x8_300e_coco", "not found"]
    if name == "unknown_sam_type":
        return base + ["--cfg-options", "model.model_type=vit_q"], ["unknown SAM type 'vit_q'", "lite_medsam"]
    if name == "sam_checkpoint_not_torch":
        f = tmp / "notes.pth"
        f.write_text("hello")
        return base + ["--cfg-options", f"model.sam_checkpoint={f}"], ["notes.pth", "not a file written by torch.save"]
    if name == "sam_checkpoint_other_size":
        f = tmp / "vit_b.pth"
        torch.save(build_sam("vit_b", random_init=True, image_size=256).state_dict(), f)
        return base + ["--cfg-options", f"model.sam_checkpoint={f}"], ["vit_b.pth", "missing keys", "unexpected keys"]
    if name == "qconfig_missing":
        return q[:3] + ["exp/nope.yaml"] + q[4:], ["q_config not found", "exp/nope.yaml"]
    if name == "qconfig_malformed_yaml":
        f = tmp / "bad.yaml"
        f.write_text("seed: 1\nrecon:\n  iters: [60\n  scale_lr: 0\n")
        return q[:3] + [str(f)] + q[4:], ["bad.yaml", "line 4"]
    if name == "qconfig_wrong_type":
        f = tmp / "types.yaml"
        f.write_text(f"root: {os.path.abspath(Q66)}\nrecon:\n  iters: sixty\n")
        return q[:3] + [str(f)] + q[4:], ["types.yaml", "'recon.iters' expects an integer", "sixty"]
    if name == "q_option_unknown_key":
        return q + ["--q-options", "recon.itters=3"], ["unknown key 'recon.itters'"]
    if name == "q_option_bad_value":
        return q + ["--q-options", "recon.iters=-5"], ["recon.iters", "-5"]
    if name == "work_dir_unwritable":
        (tmp / "afile").write_text("x")
        return ["--config", GT_CFG, "--fp", "--work-dir", str(tmp / "afile" / "w")], ["--work-dir", "afile"]
    if name == "show_dir_unwritable":
        (tmp / "afile").write_text("x")
        return base + ["--show-dir", str(tmp / "afile" / "s")], ["--show-dir", "afile"]
    if name == "save_path_is_folder":
        return q + ["--save_sam_path", str(tmp)], ["--save_sam_path", "is a folder"]
    if name == "load_sam_path_missing":
        return q + ["--load_sam_path", str(tmp / "q.pth")], ["--load_sam_path", "q.pth", "not found"]
    if name == "load_sam_path_folder":
        return q + ["--load_sam_path", str(tmp)], ["--load_sam_path", "is a folder"]
    if name == "load_sam_path_pickle":
        torch.save({"state_dict": {}, "quant_meta": _Evil(str(tmp / "ran"))}, tmp / "q.pth")
        return q + ["--load_sam_path", str(tmp / "q.pth")], ["q.pth", "pickled"]
    if name == "load_sam_path_other_qconfig":
        f = tmp / "q44.pth"
        q44 = load_qconfig("exp/demo/config44.yaml")
        torch.save({"format": COMPACT_FORMAT, "q_config": json.dumps(q44.to_dict()), "quant_encoder": False,
                    "info": "{}", "int_weights": {}, "state": {}, "quant_meta": {}}, f)
        return q + ["--load_sam_path", str(f)], ["q44.pth", "a_qconfig.bit: 4 -> 6", "w_qconfig.bit: 4 -> 6"]
    if name == "load_sam_path_old_format":
        torch.save({"state_dict": {}, "quant_meta": {}}, tmp / "old.pth")
        return q + ["--load_sam_path", str(tmp / "old.pth")], ["old.pth", "ptq4sam-compact-1", "older toolkit"]
    if name == "resume_with_fp":
        return base + ["--resume"], ["--resume", "--q_config"]
    if name == "prompts_json_other_split":
        f = tmp / "dets.json"
        f.write_text(json.dumps([{"image_id": 999999999, "bbox": [1, 2, 30, 40], "score": 0.9, "category_id": 1}]))
        return _json_cfg(f), ["dets.json", "none of its image ids", "999999999"]
    if name == "prompts_json_nan_score":
        f = tmp / "dets.json"
        im = _ann(1)["images"][0]["id"]
        f.write_text(json.dumps([{"image_id": im, "bbox": [1, 2, 30, 40], "score": float("nan"),
                                  "category_id": 1}]))
        return _json_cfg(f), ["dets.json", "entry 0", "score must be a finite number", "nan"]
    if name == "prompts_json_bad_bbox":
        f = tmp / "dets.json"
        im = _ann(1)["images"][0]["id"]
        f.write_text(json.dumps([{"image_id": im, "bbox": [1, 2, 30], "score": 0.5, "category_id": 1}]))
        return _json_cfg(f), ["dets.json", "entry 0", "bbox must be 4 finite numbers"]
    if name == "prompts_json_unknown_category":
        f = tmp / "dets.json"
        im = _ann(1)["images"][0]["id"]
        f.write_text(json.dumps([{"image_id": im, "bbox": [1, 2, 30, 40], "score": 0.5, "category_id": 4242}]))
        return _json_cfg(f), ["dets.json", "category_id 4242"]
    if name == "backend_without_onnx":
        return ["--config", GT_CFG, "--backend", "ort"], ["--backend ort", "--onnx DIR"]
    if name == "backend_with_q_config":
        return q + ["--backend", "ort", "--onnx", str(tmp)], ["--backend ort", "drop --q_config"]
    if name == "onnx_dir_without_export":
        return ["--config", GT_CFG, "--backend", "openvino", "--onnx", str(tmp)], [str(tmp), "no export.json"]
    # found by tests/test_fuzz.py (and the grid of odd values there), each a traceback before
    if name == "config_is_folder":
        return ["--config", str(tmp), "--fp"], ["--config", "is a folder"]
    if name == "config_empty":
        (tmp / "empty.py").write_text("")
        return ["--config", str(tmp / "empty.py"), "--fp"], ["empty.py", "needs 'model'"]
    if name == "config_not_utf8":
        (tmp / "latin.py").write_bytes(b"# caf\xe9\nmodel = dict()\n")
        return ["--config", str(tmp / "latin.py"), "--fp"], ["latin.py", "not UTF-8"]
    if name == "cfg_options_malformed":
        return base + ["--cfg-options", "model.sam=[1,2"], ["--cfg-options", "model.sam=[1,2"]
    if name in ("qconfig_empty", "qconfig_not_utf8", "qconfig_nan", "qconfig_list_element"):
        f = tmp / "q.yaml"
        body = {"qconfig_empty": b"", "qconfig_not_utf8": b"seed: 1\n# \xff\n",
                "qconfig_nan": f"root: {os.path.abspath(Q66)}\nrecon:\n  scale_lr: .nan\n".encode(),
                "qconfig_list_element": f"root: {os.path.abspath(Q66)}\nrecon:\n  b_range: [a, 2]\n".encode()}[name]
        f.write_bytes(body)
        return q[:3] + [str(f)] + q[4:], ["q.yaml", {"qconfig_empty": "empty", "qconfig_not_utf8": "not UTF-8",
                                                   "qconfig_nan": "'recon.scale_lr' expects a finite number",
                                                   "qconfig_list_element": "'recon.b_range' expects a list of "
                                                                           "finite numbers"}[name]]
    if name == "q_option_below_a_value":
        return q + ["--q-options", "recon=1", "recon.iters=2"], ["recon.iters=2", "'recon' was set to 1"]
    if name == "q_option_bad_yaml":
        return q + ["--q-options", "calibrate=%"], ["--q-options 'calibrate=%'", "not valid YAML"]
    if name in ("max_images_zero", "seed_negative", "score_thr_nan", "eval_unknown"):
        flag, val = {"max_images_zero": ("--max-images", "0"), "seed_negative": ("--seed", "-1"),
                     "score_thr_nan": ("--show-score-thr", "nan"), "eval_unknown": ("--eval", "mAP")}[name]
        return base[:-2] + [flag, val], [f"argument {flag}", val]
    if name.startswith("annotation_") and name[11:] in ANNOTATION_FAULTS:
        f = tmp / "ann.json"
        raw, expect = ANNOTATION_FAULTS[name[11:]](_ann(2))
        f.write_bytes(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
        return base + ["--cfg-options", f"data.test.ann_file={f}"], ["ann.json", expect]
    if name in ("prompts_json_not_utf8", "prompts_json_empty"):
        f = tmp / "dets.json"
        f.write_bytes(b"[\xff]" if name == "prompts_json_not_utf8" else b"")
        return _json_cfg(f), ["dets.json", "not UTF-8" if name == "prompts_json_not_utf8" else "is empty"]
    raise KeyError(name)


def _set(ann, path, value):
    """``ann`` with the node at ``path`` (keys / indices) replaced."""
    node = ann
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return ann


ANNOTATION_FAULTS = {  # a fault put into a valid COCO file -> what the error line says
    "not_utf8": lambda a: (b'{"images": "\xff"}', "not UTF-8"),
    "top_level_list": lambda a: ([a], "got list"),
    "duplicate_image_id": lambda a: (_set(a, ["images", 1, "id"], a["images"][0]["id"]), "appears twice"),
    "image_without_size": lambda a: (_set(a, ["images", 0, "width"], None), "'width' and 'height' must be positive"),
    "unknown_category": lambda a: (_set(a, ["annotations", 0, "category_id"], 4242), "category_id 4242"),
    "bbox_nan": lambda a: (_set(a, ["annotations", 0, "bbox"], [1, 2, float("nan"), 3]), "'bbox' must be 4 finite"),
    "rle_other_size": lambda a: (_set(a, ["annotations", 0, "segmentation"], {"counts": "0", "size": [7, 9]}),
                                 "RLE size [7, 9]"),
}


def _json_cfg(result_file):
    return ["--config", GT_CFG, "--fp", "--max-images", "1", "--cfg-options", "model.prompt.type=json",
            f"model.prompt.result_file={result_file}"]


class _Evil:  # unpickling it would create a file: every loader must refuse before that
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


CLI_ERRORS = [
    "config_missing", "config_not_python", "cfg_option_unknown_key", "cfg_option_bad_argument",
    "annotation_without_categories", "annotation_not_json", "empty_dataset", "image_listed_but_missing",
    "detector_checkpoint_missing", "unknown_sam_type", "sam_checkpoint_not_torch", "sam_checkpoint_other_size",
    "qconfig_missing", "qconfig_malformed_yaml", "qconfig_wrong_type", "q_option_unknown_key", "q_option_bad_value",
    "work_dir_unwritable", "show_dir_unwritable", "save_path_is_folder", "load_sam_path_missing",
    "load_sam_path_folder", "load_sam_path_pickle", "load_sam_path_other_qconfig", "load_sam_path_old_format", "resume_with_fp",
    "prompts_json_other_split", "prompts_json_nan_score", "prompts_json_bad_bbox", "prompts_json_unknown_category",
    "backend_without_onnx", "backend_with_q_config", "onnx_dir_without_export",
    "config_is_folder", "config_empty", "config_not_utf8", "cfg_options_malformed", "qconfig_empty",
    "qconfig_not_utf8", "qconfig_nan", "qconfig_list_element", "q_option_below_a_value", "q_option_bad_yaml",
    "max_images_zero", "seed_negative", "score_thr_nan", "eval_unknown", "prompts_json_not_utf8",
    "prompts_json_empty"] + [f"annotation_{k}" for k in ANNOTATION_FAULTS]


@needs_mmdet
@pytest.mark.parametrize("name", CLI_ERRORS)
def test_bad_input_is_one_clear_line_and_exit_2(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv, expect = _case(tmp_path, name)
    rc, _, err = _main(argv, capsys)
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ") or ": error: argument " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for s in expect:
        assert s in lines[0], (s, lines[0])
    assert "weights_only=False" not in err and not (tmp_path / "ran").exists()  # no unsafe advice, no code run


@needs_mmdet
def test_debug_shows_the_traceback(tmp_path):
    from ptq4sam.solver.runner import main

    with pytest.raises(UserError, match="unknown key 'recon.itters'"):
        main(["--config", GT_CFG, "--q_config", Q66, "--work-dir", str(tmp_path), "--q-options", "recon.itters=3",
              "--debug"])


# ---- handled cases: warned, counted, the run goes on ----------------------------------------------------------------
@needs_mmdet
@pytest.mark.parametrize("how", ["truncated", "not_an_image"])
def test_unreadable_evaluation_image_is_skipped_named_and_counted(how, tmp_path, capsys):
    ann, folder, bad = _split_with_bad_image(tmp_path, how)
    w = tmp_path / "w"
    rc, out, err = _main(["--config", GT_CFG, "--fp", "--work-dir", str(w), "--cfg-options",
                          f"data.test.ann_file={ann}", f"data.test.img_prefix={folder}/"], capsys)
    assert rc == 0, err[-2000:]
    m = json.loads((w / "metrics.json").read_text())
    assert [s["file"] for s in m["skipped_images"]] == [str(bad)] and m["num_images"] == 2
    assert ("truncated JPEG" if how == "truncated" else "cannot be decoded") in m["skipped_images"][0]["reason"]
    assert str(bad) in err and "warning" in err
    # the evaluation is that of the readable image alone
    good = tmp_path / "good.json"
    a = json.loads(ann.read_text())
    keep = a["images"][1]["id"]
    good.write_text(json.dumps({**a, "images": a["images"][1:],
                                "annotations": [x for x in a["annotations"] if x["image_id"] == keep]}))
    rc, _, err = _main(["--config", GT_CFG, "--fp", "--work-dir", str(tmp_path / "g"), "--cfg-options",
                        f"data.test.ann_file={good}", f"data.test.img_prefix={folder}/"], capsys)
    g = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert rc == 0 and g["segm_mAP"] == m["segm_mAP"] and g["skipped_images"] == []


@needs_mmdet
def test_unreadable_calibration_image_is_skipped_and_the_next_one_used(tmp_path, capsys):
    ann, folder, bad = _split_with_bad_image(tmp_path, "truncated", n=3, split=CALIB_ANN)
    w = tmp_path / "w"
    rc, _, err = _main(["--config", GT_CFG, "--q_config", Q66, "--work-dir", str(w), "--max-images", "1",
                        "--cfg-options", f"data.calib.ann_file={ann}", f"data.calib.img_prefix={folder}/",
                        "--q-options", "calibrate=2", "recon.iters=0", "ptq4sam.BIG=false", "ptq4sam.AGQ=false",
                        "w_qconfig.observer=MinMaxObserver"],  # (the weights' MSE range search is not tested here)
                       capsys)
    assert rc == 0, err[-2000:]
    m = json.loads((w / "metrics.json").read_text())
    names = [im["file_name"] for im in json.loads(ann.read_text())["images"]]
    assert m["calibration_images"] == names[1:] and [s["file"] for s in m["calibration_skipped_images"]] == [str(bad)]
    assert str(bad) in err
    rc, _, err = _main(["--config", GT_CFG, "--q_config", Q66, "--work-dir", str(w), "--max-images", "1",
                        "--cfg-options", f"data.calib.ann_file={ann}", f"data.calib.img_prefix={folder}/",
                        "--q-options", "calibrate=3"], capsys)
    assert rc == 2 and "only 2 of the 3" in err and str(bad) in err


def test_prompt_boxes_degenerate_outside_and_too_many(tmp_path):
    from projects.instance_segment_anything.models.prompt_sources import JsonPrompts

    a = _ann(2)
    (tmp_path / "ann.json").write_text(json.dumps(a))
    im, other = a["images"][0], a["images"][1]
    w = im["width"]
    dets = [{"image_id": im["id"], "bbox": [10, 10, -5, 20], "score": 0.9, "category_id": 1},  # negative width
            {"image_id": im["id"], "bbox": [10, 10, 0, 20], "score": 0.9, "category_id": 1},  # no area
            {"image_id": im["id"], "bbox": [-20, -10, 50, 40], "score": 0.8, "category_id": 1},  # partly outside
            {"image_id": im["id"], "bbox": [w + 5, 10, 30, 30], "score": 0.7, "category_id": 1},  # wholly outside
            {"image_id": 123456789, "bbox": [1, 1, 5, 5], "score": 0.7, "category_id": 1}]  # unknown image
    rng = np.random.default_rng(0)  # far more boxes than max_boxes for the other image
    dets += [{"image_id": other["id"], "bbox": [1.0, 1.0, 10.0, 10.0], "score": float(s), "category_id": 1}
             for s in rng.random(5000)]
    f = tmp_path / "dets.json"
    f.write_text(json.dumps(dets))
    with pytest.warns(UserWarning) as rec:
        src = JsonPrompts(str(f), str(tmp_path / "ann.json"), max_boxes=100)
    msgs = " | ".join(str(r.message) for r in rec)
    assert "1 image id(s) not in the annotation file" in msgs and "2 detection(s) with width or height <= 0" in msgs
    meta = lambda i: {"ori_filename": i["file_name"], "ori_shape": (i["height"], i["width"], 3)}  # noqa: E731
    with pytest.warns(UserWarning, match="wholly outside"):
        p = src(None, [meta(im)])[0]
    np.testing.assert_array_equal(p.boxes, np.array([[-20, -10, 30, 30]], np.float32))  # partly outside: kept as is
    assert src.outside == 1
    q = src(None, [meta(other)])[0]
    assert len(q.boxes) == 100 and np.all(np.diff(q.scores) <= 0)
    assert q.scores[-1] == np.sort(np.array([d["score"] for d in dets[5:]], np.float32))[-100]  # the top 100


@needs_mmdet
def test_image_whose_size_disagrees_with_its_annotation_is_refused_by_name_and_box_overhang_is_counted(tmp_path):
    """A decoded image of another size than its annotation's width x height would be scored against masks that do
    not line up: ImageReadError naming the file and both sizes (the evaluation skips and counts it, like row 1); the
    other image of the split loads. A box reaching past its image is a warning the dataset carries (metrics.json)."""
    from ptq4sam.errors import ImageReadError
    from ptq4sam.solver.data import build_eval_dataset, collate_one
    from ptq4sam.solver.runner import load_config

    a = _ann(2)
    im = a["images"][0]
    w, h = im["width"], im["height"]
    im["width"], im["height"] = h, w  # as if the file were a rotated copy
    box = next(x for x in a["annotations"] if x["image_id"] == a["images"][1]["id"])
    box["bbox"] = [box["bbox"][0], box["bbox"][1], a["images"][1]["width"] + 50, box["bbox"][3]]
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(a))
    cfg = load_config(GT_CFG, {"data.test.ann_file": str(f), "data.test.img_prefix": f"{IMG}/"})
    ds = build_eval_dataset(cfg.data.test, "data.test")
    size = {i["id"]: (i["width"], i["height"]) for i in a["images"]}
    over = sum(x["bbox"][0] + x["bbox"][2] > size[x["image_id"]][0] + 1 or
               x["bbox"][1] + x["bbox"][3] > size[x["image_id"]][1] + 1 for x in a["annotations"])
    assert over >= 1 and ds.annotation_warnings == [
        f"{f}: {over} annotation box(es) reach more than 1 pixel past their image (kept as they are)"]
    with pytest.raises(ImageReadError) as e:
        collate_one(ds, 0, torch.device("cpu"))
    assert e.value.path == str(IMG / im["file_name"])
    assert e.value.reason.startswith(f"is {w}x{h} pixels but its annotation says {h}x{w}")
    img, metas = collate_one(ds, 1, torch.device("cpu"))
    assert metas[0]["ori_shape"][:2] == (a["images"][1]["height"], a["images"][1]["width"])


# ---- calibration that meets NaN -------------------------------------------------------------------------------------
def test_nan_activation_in_calibration_names_the_quantizer():
    from ptq4sam.errors import NonFiniteActivation

    sam = build_sam("lite_medsam")
    with torch.no_grad():  # a float part upstream of the quantized decoder breaks: its NaN reaches the quantizers
        sam.prompt_encoder.point_embeddings[2].weight.fill_(float("nan"))  # the box corner embedding
    seg = BoxPromptSegmenter(sam)
    q = load_qconfig(Q66, ["recon.iters=0", "ptq4sam.BIG=false", "ptq4sam.AGQ=false"])
    with pytest.raises(NonFiniteActivation) as e:
        quantize_segmenter(seg, calib_samples(1), q, quant_encoder=False, device=torch.device("cpu"),
                           log=lambda *a: None)
    msg = str(e.value)
    assert "mask_decoder.transformer." in msg and "NaN/Inf" in msg and "quantizer" in msg


# ---- atomic outputs -------------------------------------------------------------------------------------------------
def test_interrupted_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    f = tmp_path / "metrics.json"
    atomic_write_text(f, '{"segm_mAP": 0.25}')

    def half_then_crash(tmp):
        with open(tmp, "w") as fh:
            fh.write('{"segm_mAP": 0.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(f, half_then_crash)
    assert json.loads(f.read_text()) == {"segm_mAP": 0.25} and sorted(p.name for p in tmp_path.iterdir()) == [f.name]
    atomic_write(tmp_path / "new.pth", lambda tmp: torch.save({"x": torch.ones(2)}, tmp))
    assert torch.equal(torch.load(tmp_path / "new.pth")["x"], torch.ones(2))
    assert oct((tmp_path / "new.pth").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


# ---- crash-safe reconstruction --------------------------------------------------------------------------------------
# the crash -> resume -> identical test is tests/test_pipeline.py::test_quantized_runs_are_repeatable_resumable_and_...


def test_resume_of_a_paper_eval_bugs_run_is_refused():
    from ptq4sam.reconstruction import reconstruct

    with pytest.raises(InputError, match="--paper-eval-bugs"):
        reconstruct(None, [], [], None, 0, torch.device("cpu"), paper_bugs=True, done=[{"unit": "x"}])


def test_recorded_command_lines_run_again_as_written():
    """A result file's command must be a shell line that gives the tool the same arguments (a model name with spaces,
    a variant with braces and commas), not the arguments joined by spaces."""
    import shlex

    argv = ["--ours", "W8A8 for AVX2 (float attention)=work_dirs/a.pth", "--variant",
            "mine=exp/demo/config{b}{b}.yaml,gptq.enabled=true", "--threads", "2"]
    line = command_line("tools/benchmark_deploy.py", argv)
    assert shlex.split(line) == ["python", "tools/benchmark_deploy.py", *argv]
    assert command_line("tools/x.py", ["--bits", "4"]) == "python tools/x.py --bits 4"  # plain words stay plain


def test_without_wall_times_strips_times_at_every_depth_and_keeps_small_object_map():
    """What a resumed run must reproduce: a method report's time (GPTQ's ``time_s``) and a unit's are wall times at
    any depth; COCO's small-object mAP (``segm_mAP_s``) is a result, not a time."""
    from ptq4sam.checkpoint import without_wall_times

    m = {"segm_mAP": 0.3, "segm_mAP_s": 0.1, "bbox_mAP_s": 0.2, "eval_quant_s": 3.0, "timings": {"setup_s": 1.0},
         "gptq": {"layers": 2, "time_s": 6.5, "per_layer": [{"layer": "a", "proxy_gptq": 0.1, "search_s": 0.2}]},
         "recon": [{"unit": "u", "unit_s": 1.0, "last_rec_loss": 0.5}]}
    assert without_wall_times(m) == {"segm_mAP": 0.3, "segm_mAP_s": 0.1, "bbox_mAP_s": 0.2,
                                     "gptq": {"layers": 2, "per_layer": [{"layer": "a", "proxy_gptq": 0.1}]},
                                     "recon": [{"unit": "u", "last_rec_loss": 0.5}]}
