"""Accuracy benchmark: LiteMedSAM (real weights) on the bundled coco128 split, FP and W8A8/W6A6/W4A4 x methods.

Torch-only (no mmcv/mmdet: it runs on GPU machines too). Calibration = first N images (by id) of the calibration
split, evaluation = the evaluation split, prompts = GT boxes and/or cached YOLOX-Nano detections
(data/coco128/detections/, made by tools/eval_yolox_nano.py). Writes a markdown table, a JSON with every run's
metrics and a PNG of mAP vs bit width.

    python tools/benchmark_accuracy.py                      # full grid (about an hour on 2 CPU cores)
    python tools/benchmark_accuracy.py --quick              # CI-sized
    python tools/benchmark_accuracy.py --bits 6 4 --methods qdrop qdrop+big qdrop+agq ptq4sam   # the ablation
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402
from ptq4sam.mixed import bits_label, mac_weighted_bits  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402
from ptq4sam.ptq import quantize_segmenter  # noqa: E402
from ptq4sam.qconfig import load_qconfig  # noqa: E402
from ptq4sam.quantization import perturbed_outputs  # noqa: E402
from ptq4sam.samples import CalibSample  # noqa: E402

DATA = ROOT / "data" / "coco128"
METHODS = {
    "minmax_rtn": ["w_qconfig.quantizer=FixedFakeQuantize", "w_qconfig.observer=MinMaxObserver",
                   "a_qconfig.quantizer=FixedFakeQuantize", "a_qconfig.observer=MinMaxObserver",
                   "recon.iters=0", "ptq4sam.BIG=false", "ptq4sam.AGQ=false"],
    "qdrop": ["ptq4sam.BIG=false", "ptq4sam.AGQ=false"],
    "qdrop+big": ["ptq4sam.AGQ=false"],
    "qdrop+agq": ["ptq4sam.BIG=false"],
    "ptq4sam": [],
    "ptq4sam_calib": ["recon.iters=0"],  # BIG + AGQ + calibrated ranges, round-to-nearest weights, no reconstruction
    # AHCPTQ's quantizers, smoothing and log-space scale learning on top of PTQ4SAM
    "ptq4sam+hluq": ["ahcptq.HLUQ=true"],
    "ptq4sam+cag": ["ahcptq.CAG=true"],
    "ahcptq": ["ahcptq.HLUQ=true", "ahcptq.CAG=true"],
    "ptq4sam+smooth": ["smooth.enabled=true"],
    "ptq4sam+logscale": ["recon.scale_lr=0.001", "recon.scale_space=log"],
    "qdrop+hluq": ["ptq4sam.BIG=false", "ptq4sam.AGQ=false", "ahcptq.HLUQ=true"],
    "qdrop+cag": ["ptq4sam.BIG=false", "ptq4sam.AGQ=false", "ahcptq.CAG=true"],
    "qdrop+smooth": ["ptq4sam.BIG=false", "ptq4sam.AGQ=false", "smooth.enabled=true"],
    # GPTQ weights (ptq4sam/gptq.py) instead of round-to-nearest before reconstruction
    "qdrop+gptq": ["ptq4sam.BIG=false", "ptq4sam.AGQ=false", "gptq.enabled=true"],
    "ptq4sam+gptq": ["gptq.enabled=true"],
}
LABEL = {"minmax_rtn": "MinMax RTN (no recon)", "qdrop": "QDrop", "qdrop+big": "QDrop + BIG",
         "qdrop+agq": "QDrop + AGQ", "ptq4sam": "PTQ4SAM (QDrop + BIG + AGQ)",
         "ptq4sam_calib": "PTQ4SAM, calibration only (BIG + AGQ, no reconstruction)",
         "ptq4sam+hluq": "PTQ4SAM + HLUQ", "ptq4sam+cag": "PTQ4SAM + CAG", "ahcptq": "AHCPTQ (PTQ4SAM + HLUQ + CAG)",
         "ptq4sam+smooth": "PTQ4SAM + smoothing", "ptq4sam+logscale": "PTQ4SAM + log-space LSQ scales",
         "qdrop+hluq": "QDrop + HLUQ", "qdrop+cag": "QDrop + CAG", "qdrop+smooth": "QDrop + smoothing",
         "qdrop+gptq": "QDrop + GPTQ weights", "ptq4sam+gptq": "PTQ4SAM + GPTQ weights"}


def prompts_for(kind: str, ann: dict, split: str):
    if kind == "gt":
        return coco_eval.gt_prompts(ann)
    dets = DATA / "detections" / f"yolox_nano_{split}.json"
    if not dets.is_file():
        raise FileNotFoundError(f"{dets} missing: run `python tools/eval_yolox_nano.py --split {split}`")
    return coco_eval.json_prompts(ann, dets, score_thr=0.05, max_boxes=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="*", type=int, default=[8, 6, 4],
                   help="bit widths (W = A); none: only the FP row (e.g. to --save-predictions of the FP model)")
    p.add_argument("--methods", nargs="+", default=["minmax_rtn", "qdrop", "ptq4sam"], choices=sorted(METHODS))
    p.add_argument("--prompts", nargs="+", default=["gt", "yolox"], choices=["gt", "yolox"])
    p.add_argument("--q-options", nargs="*", default=[], help="extra q_config overrides for every run")
    p.add_argument("--q-config", default=None, metavar="YAML",
                   help="this q_config instead of exp/demo/config<b><b>.yaml (e.g. a mixed-precision yaml of "
                        "tools/mixed_precision.py; --bits then only names the run)")
    p.add_argument("--decoder-only", action="store_true", help="quantize only the decoder (default: both)")
    p.add_argument("--eval-images", type=int, default=None, help="first N evaluation images (default: all 96)")
    p.add_argument("--quick", action="store_true", help="CI-sized: 8 eval images, 2 calib images, 5 iters")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "results_accuracy.md"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ablation", nargs="*", type=int, default=[],
                   help="also run QDrop+BIG and QDrop+AGQ at these bit widths (GT prompts)")
    p.add_argument("--fp-from", default=None, metavar="JSON",
                   help="take the FP row from this accuracy.json (same split and device) instead of re-evaluating")
    p.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="write each evaluated run's predictions (masks, scores, SAM's IoU) to DIR/<prompts>_<method>"
                        "_w<bits>.json (FP: DIR/<prompts>_fp.json, only when evaluated, i.e. without --fp-from), for "
                        "tools/score_split.py")
    p.add_argument("--save-dir", default=None, metavar="DIR",
                   help="also save each quantized model as a compact checkpoint DIR/<prompts>_w<b>a<b>_<method>.pth "
                        "(for tools/export_onnx.py / tools/benchmark_deploy.py)")
    p.add_argument("--perturb", nargs="+", type=float, default=[], metavar="REL",
                   help="after each quantized run, evaluate it again with float noise of this relative size on every "
                        "quantized layer's output (several seeds): how much of the mAP is settled by float rounding")
    p.add_argument("--perturb-seeds", type=int, default=3, metavar="N", help="seeds per --perturb size (default 3)")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="no runs: merge these accuracy.json files into one JSON + markdown + PNG (--out-dir/--markdown)")
    a = p.parse_args(argv)
    if any(not r >= 0 for r in a.perturb) or a.perturb_seeds < 1:  # before the minutes of quantization, not after
        p.error(f"--perturb sizes must be >= 0 (got {a.perturb}) and --perturb-seeds >= 1 (got {a.perturb_seeds})")
    if a.render:
        return render(a.render, Path(a.out_dir), Path(a.markdown))
    extra = list(a.q_options)
    if a.quick:
        a.eval_images = a.eval_images or 8
        extra = ["calibrate=2", "recon.iters=5", "ptq4sam.agq_images=1"] + extra
    device = torch.device(a.device)
    torch.manual_seed(0)
    eval_ann_file, calib_ann_file = DATA / "annotations/instances_eval96.json", DATA / "annotations/instances_calib32.json"
    eval_ann, calib_ann = coco_eval.load_ann(eval_ann_file), coco_eval.load_ann(calib_ann_file)
    base = build_sam("lite_medsam").to(device)
    runs = []
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "command": command_line("tools/benchmark_accuracy.py", argv),
           "split": "eval = data/coco128 instances_eval96.json (96 images; first N if --eval-images), "
                    "calibration = first `calibrate` images by id of instances_calib32.json"}

    def pred_file(kind, name):
        return Path(a.save_predictions) / f"{kind}_{name}.json" if a.save_predictions else None

    def save():
        (out / "accuracy.json").write_text(json.dumps({"env": env, "runs": runs}, indent=1))
        write_markdown(Path(a.markdown), env, runs)
    for kind in a.prompts:
        ev_prompts = prompts_for(kind, eval_ann, "eval96")
        cal_prompts = prompts_for(kind, calib_ann, "calib32")
        t = time.time()
        prev = [r for r in json.loads(Path(a.fp_from).read_text())["runs"]
                if r["method"] == "fp" and r["prompts"] == kind] if a.fp_from else []
        if a.fp_from and not prev:
            raise SystemExit(f"--fp-from {a.fp_from}: no FP row for {kind} prompts")
        if prev:
            fp = {k: v for k, v in prev[0].items() if k not in ("prompts", "method", "bits", "eval_s")}
            runs.append({**prev[0], "fp_from": a.fp_from})
        else:
            fp = coco_eval.evaluate(BoxPromptSegmenter(base), eval_ann_file, DATA / "train2017", ev_prompts,
                                    max_images=a.eval_images, desc=f"{kind} FP",
                                    save_predictions=pred_file(kind, "fp"))
            runs.append({"prompts": kind, "method": "fp", "bits": 32, **fp, "eval_s": round(time.time() - t, 1)})
        print(json.dumps(runs[-1]))
        save()
        grid = [(b, m) for b in a.bits for m in a.methods]
        if kind == "gt":
            grid += [(b, m) for b in a.ablation for m in ("qdrop+big", "qdrop+agq") if (b, m) not in grid]
        for bits, method in grid:
            qpath = Path(a.q_config).resolve() if a.q_config else ROOT / "exp" / "demo" / f"config{bits}{bits}.yaml"
            opts = METHODS[method] + extra
            qcfg = load_qconfig(qpath, opts)
            torch.manual_seed(qcfg.seed)
            seg = BoxPromptSegmenter(copy.deepcopy(base))
            samples = []
            for im in coco_eval.first_images(calib_ann, qcfg.calibrate):
                samples.append(CalibSample(coco_eval.read_rgb(DATA / "train2017" / im["file_name"]),
                                           cal_prompts[im["id"]][0]))
            t = time.time()
            info = quantize_segmenter(seg, samples, qcfg, not a.decoder_only, device, log=lambda *x: None).to_dict()
            t_q = time.time() - t
            avg_w, avg_a = mac_weighted_bits(seg, samples)
            saved = None
            if a.save_dir:
                from ptq4sam.checkpoint import save_quantized  # noqa: PLC0415

                saved = Path(a.save_dir) / f"{kind}_w{bits}a{bits}_{method.replace('+', '_')}.pth"
                saved.parent.mkdir(parents=True, exist_ok=True)
                save_quantized(seg.sam, saved, qcfg.to_dict(), not a.decoder_only, {"command": env["command"]})
            t = time.time()
            m = coco_eval.evaluate(seg, eval_ann_file, DATA / "train2017", ev_prompts, max_images=a.eval_images,
                                   desc=f"{kind} W{bits}A{bits} {method}",
                                   save_predictions=pred_file(kind, f"{method.replace('+', '_')}_w{bits}"))
            eval_s = round(time.time() - t, 1)
            noisy = []
            for rel in a.perturb:
                for k in range(a.perturb_seeds):
                    with perturbed_outputs(seg.sam, rel, seed=k):
                        pm = coco_eval.evaluate(seg, eval_ann_file, DATA / "train2017", ev_prompts,
                                                max_images=a.eval_images, desc=f"noise {rel:g} seed {k}")
                    noisy.append({"rel": rel, "seed": k, "segm_mAP": pm["segm_mAP"]})
            run = {"prompts": kind, "method": method, "bits": bits, **m, "q_config": _rel(qpath),
                   "avg_w_bits": avg_w, "avg_a_bits": avg_a, "mixed": bool(qcfg.overrides),
                   "q_options": opts, "seed": qcfg.seed, "calibrate": qcfg.calibrate, "recon_iters": qcfg.recon.iters,
                   "calibration_s": info["calibration_s"], "reconstruction_s": info["reconstruction_s"],
                   "recon_units": info.get("recon_units"), "agq_s": info.get("agq_search_s"),
                   "quantize_s": round(t_q, 1), "eval_s": eval_s,
                   "pct_of_fp": round(100 * m["segm_mAP"] / max(fp["segm_mAP"], 1e-9), 1),
                   **({"big_flipped": [e["layer"] for e in info["big"] if e["bimodal"]]} if "big" in info else {}),
                   "agq_tau": [e["tau"] for e in info.get("agq", [])], "saved_to": str(saved) if saved else None,
                   **({"perturbed": noisy, "perturbed_summary": perturb_summary(noisy)} if noisy else {})}
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "q_options"}))
            save()
            del seg
    plot(out / "accuracy.png", runs)
    print(f"wrote {a.markdown}, {out / 'accuracy.json'}, {out / 'accuracy.png'}")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def perturb_summary(noisy):
    """Per noise size: mean, standard deviation (n - 1), min and max of the mask mAP over the seeds."""
    out = []
    for rel in sorted({e["rel"] for e in noisy}):
        v = torch.tensor([e["segm_mAP"] for e in noisy if e["rel"] == rel], dtype=torch.float64)
        out.append({"rel": rel, "n": v.numel(), "mean": round(float(v.mean()), 4),
                    "std": round(float(v.std()), 4) if v.numel() > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max())})
    return out


def wa_label(r) -> str:
    """W/A column: FP, W<b>A<b>, or the MAC-weighted average bits of a mixed-precision run (never "W4A4")."""
    if r["method"] == "fp":
        return "FP"
    return bits_label(r["bits"], r["bits"], (r.get("avg_w_bits"), r.get("avg_a_bits")), mixed=bool(r.get("mixed")))


def render(files, out: Path, markdown: Path):
    """Merge saved grids (e.g. GT-box and YOLOX-box runs made in separate device calls) into one table and plot."""
    envs, runs = [], []
    for f in files:
        d = json.loads(Path(f).read_text())
        if not isinstance(d, dict) or "runs" not in d or "env" not in d:
            raise SystemExit(f"{f}: expected an accuracy.json written by this tool (keys 'env' and 'runs')")
        envs.append(d["env"])
        runs += d["runs"]
    env = dict(envs[0], command=" ; ".join(e["command"] for e in envs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps({"env": env, "sources": [str(f) for f in files], "runs": runs}, indent=1))
    write_markdown(markdown, env, runs)
    plot(out / "accuracy.png", runs)
    print(f"wrote {markdown}, {out / 'accuracy.json'}, {out / 'accuracy.png'}")


def write_markdown(path: Path, env, runs):
    lines = [f"Command: `{env['command']}`  ", f"Device: {env['gpu'] or 'CPU'} ({env['device']}), torch {env['torch']}  ",
             f"Split: {env['split']}; images evaluated: {runs[0]['num_images']}", "",
             "| prompts | method | W/A | mask mAP | mAP50 | mAP75 | % of FP | calib s | recon s | BIG flipped | AGQ tau |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        wa = wa_label(r)
        lines.append(f"| {r['prompts']} | {LABEL.get(r['method'], 'FP')} | {wa} | {r['segm_mAP']:.4f} | "
                     f"{r['segm_mAP_50']:.4f} | {r['segm_mAP_75']:.4f} | {r.get('pct_of_fp', 100.0)} | "
                     f"{r.get('calibration_s', '')} | {r.get('reconstruction_s', '')} | "
                     f"{','.join(r.get('big_flipped', [])) or ('none' if 'big_flipped' in r else '')} | "
                     f"{','.join(map(str, r.get('agq_tau', [])))} |")
    noisy = [r for r in runs if r.get("perturbed_summary")]
    if noisy:
        lines += ["", "Mask mAP of the same quantized model with float noise on every quantized layer's output "
                      "(`--perturb`; mean +- std over seeds, min - max):", "",
                  "| prompts | method | W/A | mask mAP | noise | mask mAP with noise | min - max |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in noisy:
            for e in r["perturbed_summary"]:
                lines.append(f"| {r['prompts']} | {LABEL.get(r['method'])} | {wa_label(r)} | {r['segm_mAP']:.4f} | "
                             f"{e['rel']:g} (n={e['n']}) | {e['mean']:.4f} +- {e['std']:.4f} | "
                             f"{e['min']:.4f} - {e['max']:.4f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, runs):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    kinds = sorted({r["prompts"] for r in runs})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in runs if r["prompts"] == kind]
        fp = [r for r in rs if r["method"] == "fp"][0]["segm_mAP"]
        ax.axhline(fp, color="k", ls="--", label="FP")
        for method in [m for m in METHODS if any(r["method"] == m for r in rs)]:
            pts = sorted((r["bits"], r["segm_mAP"]) for r in rs if r["method"] == method)
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=LABEL[method])
        ax.set_xlabel("bits (W = A)")
        ax.set_ylabel("mask mAP")
        ax.set_title(f"LiteMedSAM, {kind} prompts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
