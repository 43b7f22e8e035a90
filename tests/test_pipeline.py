"""The mmdet pipeline: FP evaluation on real data, detector conversion, prompt sources, errors, distributed."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, EVAL_ANN, ROOT, capped_ann, needs_mmdet, run_cli, run_main

pytestmark = needs_mmdet
GT_CFG = "projects/configs/lite_medsam/gt-box_lite-medsam.py"
YOLO_CFG = "projects/configs/lite_medsam/yolox-nano_lite-medsam.py"

# Reference FP numbers on the first 4 images of the evaluation split (LiteMedSAM, GT boxes), from
# `python ptq4sam/solver/test_quant.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py --fp --max-images 4`
REF_FP_GT4 = 0.1621


@pytest.fixture(scope="module")
def fp_gt4(tmp_path_factory):
    w = tmp_path_factory.mktemp("fp_gt4")
    p = run_main(["--config", GT_CFG, "--fp", "--work-dir", str(w), "--max-images", "4", "--show-dir", str(w / "show")])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return w, json.loads((w / "metrics.json").read_text()), p.stdout


def test_fp_gt_boxes_metrics(fp_gt4):
    w, m, out = fp_gt4
    assert m["num_images"] == 4 and m["seed"] == 0 and m["quantized"] is False
    assert m["bbox_mAP"] == pytest.approx(1.0)  # GT boxes are the prompts
    assert 0.05 < m["segm_mAP"] < 0.9  # a real LiteMedSAM result
    if REF_FP_GT4 is not None:
        assert m["segm_mAP"] == pytest.approx(REF_FP_GT4, abs=1e-3)
    assert "segm_mAP" in out and "config=" in out and "seed=0" in out
    pngs = sorted((w / "show").glob("*.png"))
    assert len(pngs) == 4


def test_cfg_options_override_data_and_image_without_boxes(tmp_path):
    ann = json.loads(EVAL_ANN.read_text())
    im1, im2 = sorted(ann["images"], key=lambda i: i["id"])[:2]
    # im2 keeps no annotation: GT prompts give it zero boxes -> it simply has no masks
    sub = {"images": [im1, im2], "annotations": [a for a in ann["annotations"] if a["image_id"] == im1["id"]],
           "categories": ann["categories"]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(sub))
    r = run_main(["--config", GT_CFG, "--fp", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "r.pkl"),
                  "--cfg-options", f"data.test.ann_file={p}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "w" / "metrics.json").read_text())["num_images"] == 2
    import mmcv

    res = mmcv.load(str(tmp_path / "r.pkl"))
    assert sum(len(b) for b in res[1][0]) == 0 and sum(len(m) for m in res[1][1]) == 0
    assert sum(len(b) for b in res[0][0]) > 0


def test_zero_boxes_image_has_no_masks():
    import torch

    from ptq4sam.models import BoxPromptSegmenter, build_sam

    seg = BoxPromptSegmenter(build_sam("lite_medsam"))
    img = np.zeros((40, 60, 3), np.uint8)
    out = seg(img, np.zeros((0, 4), np.float32))
    assert out.masks.shape == (0, 40, 60) and out.iou.shape == (0,)
    assert out.masks.dtype == torch.bool


def test_missing_sam_checkpoint_is_clear():
    from ptq4sam.models import CheckpointError, build_sam

    with pytest.raises(CheckpointError) as e:
        build_sam("vit_b", "ckpt/does_not_exist.pth")
    assert "does_not_exist.pth" in str(e.value) and "sam_vit_b_01ec64.pth" in str(e.value)
    with pytest.raises(KeyError) as e:
        build_sam("vit_x")
    assert "vit_x" in str(e.value) and "lite_medsam" in str(e.value)


# bad inputs through the CLI: tests/test_reliability.py (the table of docs/reliability.md)


def test_yolox_nano_conversion_matches_onnx(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_yolox_nano_onnx as conv

    model = conv.convert(conv.DEFAULT_ONNX)
    for name in ("000000000009.jpg", "000000000164.jpg"):
        assert conv.check_against_onnx(model, conv.DEFAULT_ONNX, DATA / "train2017" / name) < conv.MATCH_TOL
    # the tolerance separates float rounding from a mapping error: one weight 10 % off is far outside it
    import torch

    with torch.no_grad():
        model.backbone.stem.conv.conv.weight.mul_(1.1)
    assert conv.check_against_onnx(model, conv.DEFAULT_ONNX, DATA / "train2017" / "000000000009.jpg") > 10 * conv.MATCH_TOL


def test_yolox_nano_box_map_equals_onnx(tmp_path):
    ann = json.loads(EVAL_ANN.read_text())
    ims = sorted(ann["images"], key=lambda i: i["id"])[:12]
    ids = {i["id"] for i in ims}
    sub = tmp_path / "ann12.json"
    sub.write_text(json.dumps({**ann, "images": ims, "annotations": [a for a in ann["annotations"]
                                                                      if a["image_id"] in ids]}))
    r = subprocess.run([sys.executable, "tools/eval_yolox_nano.py", "--ann", str(sub), "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["onnx_bbox_mAP"] > 0.2
    assert s["mmdet_bbox_mAP"] == pytest.approx(s["onnx_bbox_mAP"], abs=1e-3)


def test_json_prompts_equal_detector_prompts(tmp_path):
    """Cached detections (COCO results JSON) give the same prompts as running the detector."""
    import mmcv

    import projects.instance_segment_anything  # noqa: F401
    from projects.instance_segment_anything.models.prompt_sources import DetectorPrompts, JsonPrompts
    from ptq4sam.solver.runner import build_eval_dataset, collate_one, load_config

    cfg = load_config(str(ROOT / YOLO_CFG), {})
    ds = build_eval_dataset(cfg.data.test, "data.test")
    det = DetectorPrompts(cfg.model.prompt.config, cfg.model.prompt.checkpoint, score_thr=0.05, max_boxes=100)
    results, per = [], []
    ann = json.loads(EVAL_ANN.read_text())
    cat_ids = [c["id"] for c in sorted(ann["categories"], key=lambda c: c["id"])]
    for idx in range(3):
        img, metas = collate_one(ds, idx, "cpu")
        pr = det(img, metas)[0]
        per.append(pr)
        image_id = ds.data_infos[idx]["id"]
        results += [{"image_id": image_id, "category_id": cat_ids[int(lab)], "score": float(s),
                     "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                    for b, s, lab in zip(pr.boxes, pr.scores, pr.labels)]
    f = tmp_path / "dets.json"
    mmcv.dump(results, str(f))
    js = JsonPrompts(str(f), str(EVAL_ANN), score_thr=0.05, max_boxes=100)
    for idx in range(3):
        img, metas = collate_one(ds, idx, "cpu")
        got = js(img, metas)[0]
        np.testing.assert_allclose(got.boxes, per[idx].boxes, atol=1e-3)
        np.testing.assert_array_equal(got.labels, per[idx].labels)


def test_distributed_equals_single_process(tmp_path, fp_gt4):
    _, single, _ = fp_gt4
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29531", "ptq4sam/solver/test_quant.py",
           "--config", GT_CFG, "--fp", "--launcher", "pytorch", "--work-dir", str(tmp_path), "--max-images", "4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    multi = json.loads((tmp_path / "metrics.json").read_text())
    assert multi["world_size"] == 2
    for k in ("segm_mAP", "segm_mAP_50", "segm_mAP_75", "bbox_mAP"):
        assert multi[k] == single[k]


def test_quantized_runs_are_repeatable_resumable_and_save_load_identical(tmp_path):
    """One run (a); the same run crashed after reconstruction unit 4 of 9 (inside the second decoder block) and
    resumed (b): metrics.json and the saved quantized state are identical to a's; a's checkpoint loaded (c)
    evaluates identically."""
    import torch

    from ptq4sam.checkpoint import without_wall_times
    from ptq4sam.deploy.compact import same_checkpoint

    # 4 prompts on the calibration image, 2 drawn per step: the resumed run draws the same boxes too
    common = ["--config", GT_CFG, "--q_config", "exp/demo/config66.yaml", "--max-images", "1",
              "--cfg-options", f"data.calib.ann_file={capped_ann(tmp_path / 'calib.json', 4)}",
              "--q-options", "calibrate=1", "recon.iters=2", "recon.max_boxes=2", "ptq4sam.agq_images=1",
              # repeatability, not the algorithms (tests/test_fidelity.py): the cheaper AGQ grid, and no BIG (it
              # folds nothing on LiteMedSAM: only its bimodality test would run)
              "ptq4sam.agq_search=grid", "ptq4sam.taus=[2, 4]", "ptq4sam.scale_ratios=[1.0, 0.8]", "ptq4sam.BIG=false",
              # min / max weight ranges: the MSE range search (15 s on one thread) runs once per weight and is
              # cached, so the crashed and the resumed run would read the first run's ranges anyway
              "w_qconfig.observer=MinMaxObserver",
              "gptq.enabled=true"]  # AdaRound on GPTQ's (not the float) weights: saved, resumed mid-way, loaded
    a = run_main(common + ["--work-dir", str(tmp_path / "a"), "--save_sam_path", str(tmp_path / "a.pth")])
    assert a.returncode == 0, a.stderr[-3000:]
    # a real process that dies (the others run test_quant.py's main() in this process: the same code path)
    crash = run_cli(common + ["--work-dir", str(tmp_path / "b")], env={"PTQ4SAM_CRASH_AFTER_UNIT": "4"})
    assert crash.returncode != 0 and "simulated crash after reconstruction unit 4" in crash.stderr
    assert not (tmp_path / "b" / "metrics.json").exists() and (tmp_path / "b" / "recon_state.pt").is_file()
    # (a resume with other settings is refused: test_resume_state_of_other_settings_is_refused)
    b = run_main(common + ["--work-dir", str(tmp_path / "b"), "--resume", "--save_sam_path", str(tmp_path / "b.pth")])
    c = run_main(common + ["--work-dir", str(tmp_path / "c"), "--load_sam_path", str(tmp_path / "a.pth")])
    assert b.returncode == 0 and c.returncode == 0, b.stderr[-2000:] + c.stderr[-2000:]
    assert "4 of 9 reconstruction units done" in b.stdout
    assert not (tmp_path / "b" / "recon_state.pt").exists()  # the finished run removes its resume state
    ma, mb, mc = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "abc")
    for m in (ma, mb):  # the file embeds the run's info (wall times, the resume marker): its size may differ by an
        for k in ("bytes", "ratio"):  # alignment block; its tensors are compared bit for bit below
            m.get("saved_checkpoint", {}).pop(k, None)
    assert mb["resumed_after_unit"] == 4 and without_wall_times(ma) == without_wall_times(mb)
    assert len(ma["recon"]) == 9 and "final_rec_loss" in ma["recon"][0]
    sa, sb = (torch.load(tmp_path / f"{x}.pth", weights_only=True) for x in "ab")
    assert without_wall_times(json.loads(sa.pop("info"))) == without_wall_times(json.loads(sb.pop("info")))
    assert same_checkpoint(sa, sb) and len(sa["int_weights"]) > 0  # every tensor, bit for bit
    keys = [k for k in ma if k.startswith(("segm_", "bbox_"))]
    assert keys and all(ma[k] == mc[k] for k in keys) and mc["loaded_from"].endswith("a.pth")
    assert ma["paper_eval_bugs"] is False
    assert ma["bits"] == {"w": 6, "a": 6} and ma["quantized_parts"] == ["mask_decoder.transformer"]
    assert ma["gptq"]["layers"] > 0


def test_resume_state_of_other_settings_is_refused(tmp_path):
    import pytest
    import torch

    from ptq4sam.checkpoint import ReconCheckpoint
    from ptq4sam.models.sam_builder import CheckpointError

    path = tmp_path / "recon_state.pt"
    ReconCheckpoint(path, {"q_config": {"recon": {"iters": 2}}, "seed": 1}).save(
        torch.nn.Linear(2, 2), 4, 9, {}, [], {})
    same = ReconCheckpoint(path, {"q_config": {"recon": {"iters": 2}}, "seed": 1}, resume=True).load()
    assert same["units_done"] == 4 and same["n_units"] == 9
    with pytest.raises(CheckpointError, match=r"other settings \(q_config: .*'iters': 2.* -> .*'iters': 3"):
        ReconCheckpoint(path, {"q_config": {"recon": {"iters": 3}}, "seed": 1}, resume=True).load()


def test_fp_baseline_is_cached_and_equals_a_fresh_evaluation(tmp_path):
    common = ["--config", GT_CFG, "--q_config", "exp/demo/config66.yaml", "--max-images", "1", "--fp-baseline",
              "--cfg-options", f"data.calib.ann_file={capped_ann(tmp_path / 'calib.json')}",
              "--q-options", "calibrate=1", "recon.iters=0", "ptq4sam.AGQ=false", "ptq4sam.BIG=false",
              "w_qconfig.observer=MinMaxObserver"]  # (the FP cache is tested, not the quantization)
    runs = {}
    for name, extra in (("fresh", ["--no-fp-cache"]), ("first", []), ("second", [])):
        r = run_main(common + extra + ["--work-dir", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert "fp_cached" not in runs["fresh"] and "eval_fp_baseline_s" in runs["fresh"]["timings"]
    assert "fp_cached" in runs["second"] and "eval_fp_baseline_s" not in runs["second"]["timings"]  # not re-run
    assert runs["fresh"]["fp"] == runs["first"]["fp"] == runs["second"]["fp"]


def test_torch_only_coco_eval_equals_mmdet_pipeline(fp_gt4):
    """ptq4sam.coco_eval (no mmdet; used by the benchmarks and on GPU machines) gives the mmdet pipeline's numbers."""
    from ptq4sam import coco_eval
    from ptq4sam.models import BoxPromptSegmenter, build_sam

    _, m, _ = fp_gt4
    ann = coco_eval.load_ann(EVAL_ANN)
    got = coco_eval.evaluate(BoxPromptSegmenter(build_sam("lite_medsam")), EVAL_ANN, DATA / "train2017",
                             coco_eval.gt_prompts(ann), max_images=4)
    for k in ("segm_mAP", "segm_mAP_50", "segm_mAP_75", "bbox_mAP"):
        assert got[k] == pytest.approx(m[k], abs=1e-3)


def test_seed_reaches_calibration_order_qdrop_and_reconstruction(tmp_path):
    """--seed is the run's one seed: it picks the calibration images (calibrate_mode random: seeds 7 and 8 pick
    other images), QDrop's masks and the reconstruction's sampling (seeds 7 and 26 pick the same image, then differ);
    metrics.json and the resolved q_config record it; the same seed is bit-identical."""
    from ptq4sam.checkpoint import without_wall_times

    common = ["--config", GT_CFG, "--q_config", "exp/demo/config66.yaml", "--max-images", "1",
              "--cfg-options", f"data.calib.ann_file={capped_ann(tmp_path / 'calib.json', 4)}",
              "--q-options", "calibrate=1", "calibrate_mode=random", "recon.max_boxes=2",
              "recon.units=block", "ptq4sam.AGQ=false", "ptq4sam.BIG=false",
              "w_qconfig.observer=MinMaxObserver"]  # (weight ranges do not depend on the seed)
    runs = {}
    # seed 8 only shows another calibration image: no reconstruction needed there
    for name, seed, iters in (("s7", "7", 3), ("s7_again", "7", 3), ("s8", "8", 0), ("s26", "26", 3)):
        r = run_main(common + [f"recon.iters={iters}", "--seed", seed, "--work-dir", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    for name, seed in (("s7", 7), ("s8", 8)):
        assert runs[name]["seed"] == seed and runs[name]["q_config_resolved"]["seed"] == seed
    assert runs["s7"]["calibration_images"] != runs["s8"]["calibration_images"]
    assert runs["s7"]["calibration_images"] == runs["s26"]["calibration_images"]
    assert without_wall_times(runs["s7"]) == without_wall_times(runs["s7_again"])
    losses = {n: [u["last_rec_loss"] for u in m["recon"]] for n, m in runs.items() if n != "s8"}
    assert losses["s7"] == losses["s7_again"] and losses["s7"] != losses["s26"]
