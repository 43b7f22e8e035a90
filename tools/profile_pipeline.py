"""Where the time goes: FP evaluation, calibration, BIG / AGQ, reconstruction and quantized evaluation of LiteMedSAM
on the bundled coco128 split, each stage timed apart (torch only, GT-box prompts, the demo q_config).

    python tools/profile_pipeline.py                         # 16 eval images, the demo yaml as it is
    python tools/profile_pipeline.py --eval-images 96 --json docs/results/profile_cpu.json
    python tools/profile_pipeline.py --q-options recon.iters=10 calibrate=4   # a shorter PTQ

Evaluation stages per image: image read, encoder, decoder (prompt encoder + mask decoder, all boxes), mask
post-processing (upscale to the original size + threshold) and RLE encoding. PTQ phases come from
``quantize_segmenter`` (BIG, calibration, AGQ, reconstruction, with seconds per unit-iteration by unit type).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402
from ptq4sam.ptq import quantize_segmenter  # noqa: E402
from ptq4sam.qconfig import load_qconfig  # noqa: E402
from ptq4sam.samples import gt_box_samples  # noqa: E402

DATA = ROOT / "data" / "coco128"
STAGES = ("read", "encoder", "decoder", "postprocess", "rle")


@torch.no_grad()
def profile_eval(seg, ann, prompts, n_images):
    t = defaultdict(float)
    boxes_total = 0
    ims = coco_eval.first_images(ann, n_images)
    t_all = time.perf_counter()
    for im in ims:
        boxes = prompts[im["id"]][0]
        t0 = time.perf_counter()
        img = coco_eval.read_rgb(DATA / "train2017" / im["file_name"])
        t1 = time.perf_counter()
        feats, input_size, original_size = seg.encode(img)
        t2 = time.perf_counter()
        t["read"] += t1 - t0
        t["encoder"] += t2 - t1
        if len(boxes) == 0:
            continue
        boxes_total += len(boxes)
        bt = torch.as_tensor(boxes)
        for i in range(0, len(boxes), seg.box_batch):
            t3 = time.perf_counter()
            low, _ = seg.decode(feats, bt[i:i + seg.box_batch], original_size)
            t4 = time.perf_counter()
            masks = seg.postprocess(low, input_size, original_size)
            t5 = time.perf_counter()
            coco_eval.encode_masks(masks)
            t6 = time.perf_counter()
            t["decoder"] += t4 - t3
            t["postprocess"] += t5 - t4
            t["rle"] += t6 - t5
    wall = time.perf_counter() - t_all
    n = len(ims)
    return {"images": n, "boxes": boxes_total, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 3),
            "ms_per_image": {k: round(1e3 * t[k] / n, 1) for k in STAGES},
            "decoder_ms_per_box": round(1e3 * t["decoder"] / max(1, boxes_total), 2)}


def recon_by_type(infos):
    out = defaultdict(lambda: {"units": 0, "iters": 0, "optimize_s": 0.0, "unit_s": 0.0})
    for r in infos:
        kind = r["unit"].split(" ", 2)[-1]
        o = out[kind]
        o["units"] += 1
        o["optimize_s"] += r.get("optimize_s", 0.0)
        o["unit_s"] += r.get("unit_s", 0.0)
        o["iters"] += round(r.get("optimize_s", 0.0) / r["iter_s"]) if r.get("iter_s") else 0
    return {k: {**v, "optimize_s": round(v["optimize_s"], 1), "unit_s": round(v["unit_s"], 1),
                "s_per_unit_iter": round(v["optimize_s"] / max(1, v["iters"]), 3)} for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q_config", default=str(ROOT / "exp/demo/config66.yaml"))
    p.add_argument("--q-options", nargs="*", default=[])
    p.add_argument("--eval-images", type=int, default=16)
    p.add_argument("--decoder-only", action="store_true")
    p.add_argument("--skip-ptq", action="store_true", help="FP evaluation only")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    eval_ann, calib_ann = (coco_eval.load_ann(DATA / f"annotations/instances_{s}.json") for s in ("eval96", "calib32"))
    ev_prompts = coco_eval.gt_prompts(eval_ann)
    t = time.perf_counter()
    base = build_sam("lite_medsam")
    res = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                   "processor": platform.processor() or platform.machine(),
                   "command": command_line("tools/profile_pipeline.py", argv)},
           "build_s": round(time.perf_counter() - t, 2)}
    seg = BoxPromptSegmenter(base)
    profile_eval(seg, eval_ann, ev_prompts, 1)  # warm-up
    res["fp_eval"] = profile_eval(seg, eval_ann, ev_prompts, a.eval_images)
    print(json.dumps({"fp_eval": res["fp_eval"]}))
    if not a.skip_ptq:
        qcfg = load_qconfig(a.q_config, a.q_options)
        torch.manual_seed(qcfg.seed)
        qseg = BoxPromptSegmenter(copy.deepcopy(base), box_batch=seg.box_batch)
        samples = gt_box_samples(calib_ann, DATA / "train2017", qcfg.calibrate)
        t = time.perf_counter()
        info = quantize_segmenter(qseg, samples, qcfg, not a.decoder_only, torch.device("cpu"),
                                  log=lambda *x: None).to_dict()
        res["ptq"] = {"q_config": a.q_config, "q_options": a.q_options, "calibration_images": len(samples),
                      "recon_iters": qcfg.recon.iters, "total_s": round(time.perf_counter() - t, 1),
                      "phases_s": info["ptq_phases_s"],
                      "calibration_s_per_image": round(info["ptq_phases_s"]["calibration"] / len(samples), 2),
                      "reconstruction_by_unit_type": recon_by_type(info.get("recon", []))}
        print(json.dumps({"ptq": res["ptq"]}))
        res["quant_eval"] = profile_eval(qseg, eval_ann, ev_prompts, a.eval_images)
        res["quant_eval"]["time_vs_fp"] = round(res["quant_eval"]["wall_s"] / res["fp_eval"]["wall_s"], 2)
        print(json.dumps({"quant_eval": res["quant_eval"]}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.json}")
    return res


if __name__ == "__main__":
    main()
