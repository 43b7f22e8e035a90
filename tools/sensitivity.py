"""Per-unit sensitivity of LiteMedSAM to low-bit quantization: one reconstruction unit quantized at a time.

The model is calibrated once at the low bit width (the q_config's observers, BIG / AGQ as configured, round-to-nearest
weights: no reconstruction); then every unit (each attention, MLP, lone conv, the neck: the paper's reconstruction
units) is quantized alone, the rest float, and we measure (1) the error of the mask logits against the float model
on the calibration images (mean squared error / variance of the float logits) and (2) the mask mAP drop on the first
``--eval-images`` evaluation images (0 = skip). Writes JSON (with each unit's layers and MACs, the input of
tools/mixed_precision.py) and a bar chart.

    python tools/sensitivity.py --bits 4 --out-dir docs/results/sensitivity
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402
from ptq4sam.mixed import layer_macs  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402
from ptq4sam.progress import progress  # noqa: E402
from ptq4sam.ptq import quantize_segmenter  # noqa: E402
from ptq4sam.qconfig import load_qconfig  # noqa: E402
from ptq4sam.quant_sam import recon_units  # noqa: E402
from ptq4sam.quantization import disable_all, enable_quantization, freeze  # noqa: E402
from ptq4sam.quantization.qmodules import _QuantWeightMixin  # noqa: E402
from ptq4sam.samples import gt_box_samples  # noqa: E402

DATA = ROOT / "data" / "coco128"


def calibrated_setup(bits: int, q_config, q_options, calib_images: int):
    """(q_config path, QConfig with recon.iters=0, calibration samples, float LiteMedSAM, its segmenter, the first
    ``calib_images`` samples with boxes, their float low-res mask logits) for the tools that quantize without
    reconstruction (default q_config: exp/demo/config<b><b>-mse.yaml)."""
    qpath = Path(q_config) if q_config else ROOT / "exp" / "demo" / f"config{bits}{bits}-mse.yaml"
    qcfg = load_qconfig(qpath, ["recon.iters=0"] + list(q_options))
    torch.manual_seed(qcfg.seed)
    samples = gt_box_samples(coco_eval.load_ann(DATA / "annotations/instances_calib32.json"), DATA / "train2017",
                             qcfg.calibrate)
    base = build_sam("lite_medsam")
    fp_seg = BoxPromptSegmenter(copy.deepcopy(base))
    probe = [s for s in samples if len(s.boxes)][:calib_images]
    with torch.no_grad():
        ref = [fp_seg(s.image, s.boxes).low_res_logits for s in probe]
    return qpath, qcfg, samples, base, fp_seg, probe, ref


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """The arguments of :func:`calibrated_setup` (shared with tools/layer_errors.py)."""
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--q-config", default=None, help="default: exp/demo/config<b><b>-mse.yaml (4 or 6 bits)")
    p.add_argument("--q-options", nargs="*", default=[])
    p.add_argument("--calib-images", type=int, default=4, help="calibration images the logit errors are measured on")


def logit_error(seg, probe, ref) -> float:
    """Mean over ``probe`` of the low-res mask logits' MSE against the float ``ref``, over the float logits' variance."""
    with torch.no_grad():
        e = [float((seg(s.image, s.boxes).low_res_logits - r).pow(2).mean() / r.var()) for s, r in zip(probe, ref)]
    return sum(e) / len(e)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p)
    p.add_argument("--eval-images", type=int, default=16, help="evaluation images for the mAP drop (0: skip)")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "results" / "sensitivity"))
    a = p.parse_args(argv)
    qpath, qcfg, samples, base, fp_seg, probe, ref = calibrated_setup(a.bits, a.q_config, a.q_options, a.calib_images)
    eval_file = DATA / "annotations/instances_eval96.json"
    ev_prompts = coco_eval.gt_prompts(coco_eval.load_ann(eval_file))
    fp_map = None
    if a.eval_images:
        fp_map = coco_eval.evaluate(fp_seg, eval_file, DATA / "train2017", ev_prompts, max_images=a.eval_images,
                                    desc="FP")["segm_mAP"]
    seg = BoxPromptSegmenter(copy.deepcopy(base))
    t = time.time()
    quantize_segmenter(seg, samples, qcfg, True, torch.device("cpu"), log=lambda *x: None)
    sam = seg.sam
    names = {id(m): n for n, m in sam.named_modules()}
    macs = layer_macs(sam, lambda: seg(probe[0].image, probe[0].boxes[:1]))
    rows = []
    for unit in progress(recon_units(sam, True, "module"), desc="sensitivity: units"):
        name = names[id(unit)]
        layers = [f"{name}.{n}" if n else name for n, m in unit.named_modules() if isinstance(m, _QuantWeightMixin)]
        disable_all(sam)
        enable_quantization(unit)
        freeze(sam)
        row = {"name": name, "type": type(unit).__name__, "layers": layers, "macs": sum(macs.get(n, 0) for n in layers),
               "error": logit_error(seg, probe, ref)}
        if a.eval_images:
            m = coco_eval.evaluate(seg, eval_file, DATA / "train2017", ev_prompts, max_images=a.eval_images,
                                   desc=name.split(".")[-1])["segm_mAP"]
            row.update(segm_mAP=m, mAP_drop=round(fp_map - m, 4))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    disable_all(sam)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": command_line("tools/sensitivity.py", argv),
           "q_config": str(qpath), "q_options": ["recon.iters=0"] + list(a.q_options), "bits": a.bits,
           "seed": qcfg.seed, "calibrate": qcfg.calibrate, "error_images": len(probe), "eval_images": a.eval_images,
           "fp_segm_mAP": fp_map, "macs": macs, "seconds": round(time.time() - t, 1), "units": rows}
    (out / "sensitivity.json").write_text(json.dumps(doc, indent=1))
    plot(out / "sensitivity.png", rows, a.bits)
    print(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.png'}")


def plot(path: Path, rows, bits: int):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = len(rows)
    two = any("mAP_drop" in r for r in rows)
    fig, axes = plt.subplots(2 if two else 1, 1, figsize=(max(10, n * 0.22), 7 if two else 4), squeeze=False)
    labels = [r["name"].replace("image_encoder.", "enc.").replace("mask_decoder.transformer.", "dec.") for r in rows]
    axes[0][0].bar(range(n), [r["error"] for r in rows], color="tab:blue")
    axes[0][0].set_ylabel("mask-logit MSE / var")
    axes[0][0].set_yscale("log")
    axes[0][0].set_title(f"LiteMedSAM: one unit at W{bits}A{bits}, the rest float")
    if two:
        axes[1][0].bar(range(n), [r.get("mAP_drop", 0) for r in rows], color="tab:red")
        axes[1][0].set_ylabel("mask mAP drop")
    ax = axes[-1][0]
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    if two:
        axes[0][0].set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
