"""Is one model's mask mAP really above another's? A paired bootstrap over the evaluation images.

On 96 images one mAP number moves by points when a few masks change, so "ours 99.4 % vs the peer's 102.0 % of FP" may
or may not be a difference. This tool takes saved predictions of the same images (``benchmark_accuracy.py
--save-predictions DIR`` or ``benchmark_deploy.py --save-predictions DIR``), draws ``--samples`` resamples of the images
with replacement (the same draws for every model: paired), recomputes every model's mask mAP on each, and reports
for each model against ``--ref``: the difference on the split, its 95 % interval over the resamples and the share of
resamples in which the model is at least as good as the reference. With ``--fp`` the differences are also given in
points of FP mask mAP (per resample, the FP model's mAP on the same draw).

    python tools/benchmark_deploy.py ... --save-predictions P
    python tools/compare_predictions.py --ref P/nncf_openvino.json --q P/ours_w8a8_openvino.json --fp P/fp32_ort.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402


def summarize(names, full, samples, ref: int, fp=None, level: float = 0.95):
    """Rows of the comparison: each model against column ``ref`` of ``samples`` (samples x models)."""
    lo, hi = 100 * (1 - level) / 2, 100 - 100 * (1 - level) / 2
    rows = []
    for j, name in enumerate(names):
        d = samples[:, j] - samples[:, ref]
        row = {"name": name, "segm_mAP": round(full[j], 4), "diff_vs_ref": round(full[j] - full[ref], 4),
               "diff_ci": [round(float(np.percentile(d, lo)), 4), round(float(np.percentile(d, hi)), 4)],
               "share_at_least_ref": round(float(np.mean(d >= 0)), 3)}
        if fp is not None:
            f = samples[:, fp]
            row["pct_of_fp"] = round(100 * full[j] / full[fp], 1)
            dp = 100 * d / f
            row["diff_pct_of_fp"] = round(100 * (full[j] - full[ref]) / full[fp], 1)
            row["diff_pct_of_fp_ci"] = [round(float(np.percentile(dp, lo)), 1), round(float(np.percentile(dp, hi)), 1)]
        rows.append(row)
    return rows


def markdown(rows, ref_name: str, level: float) -> str:
    pct = "pct_of_fp" in rows[0]
    head = ["predictions", "mask mAP"] + (["% of FP"] if pct else []) + [
        f"minus {ref_name}", f"{100 * level:.0f} % interval"] + (
        ["in points of FP", f"{100 * level:.0f} % interval (points of FP)"] if pct else []) + [
        f"resamples at least {ref_name}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['segm_mAP']:.4f}"] + ([f"{r['pct_of_fp']:.1f}"] if pct else []) + [
            f"{r['diff_vs_ref']:+.4f}", f"[{r['diff_ci'][0]:+.4f}, {r['diff_ci'][1]:+.4f}]"] + (
            [f"{r['diff_pct_of_fp']:+.1f}", f"[{r['diff_pct_of_fp_ci'][0]:+.1f}, {r['diff_pct_of_fp_ci'][1]:+.1f}]"]
            if pct else []) + [f"{100 * r['share_at_least_ref']:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the reference model's predictions (JSON)")
    p.add_argument("--q", nargs="+", required=True, help="other models' predictions (JSON), same images")
    p.add_argument("--fp", default=None, help="the FP model's predictions: differences also in points of FP mAP")
    p.add_argument("--ann", default=str(ROOT / "data/coco128/annotations/instances_eval96.json"))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--out", default=None, help="write the comparison as JSON here (and a markdown table beside it)")
    a = p.parse_args(argv)
    if not 0 < a.level < 1:
        p.error(f"--level must be in (0, 1), got {a.level}")
    if a.samples < 1:
        p.error(f"--samples must be >= 1, got {a.samples}")
    files = [a.ref] + a.q + ([a.fp] if a.fp else [])
    preds = [coco_eval.load_predictions(f) for f in files]
    names = [f"{Path(f).parent.name}/{Path(f).stem}" for f in files]
    boot = coco_eval.bootstrap_map(a.ann, preds, a.samples, a.seed)
    rows = summarize(names, boot["full"], boot["samples"], 0, len(files) - 1 if a.fp else None, a.level)
    table = markdown(rows, names[0], a.level)
    print(table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = command_line("tools/compare_predictions.py", argv)
        out.write_text(json.dumps({"command": cmd, "ann": a.ann, "files": files, "samples": a.samples, "seed": a.seed,
                                   "images": boot["images"], "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(f"Command: `{cmd}`  \nPaired bootstrap over {boot['images']} images, "
                                          f"{a.samples} resamples, seed {a.seed}\n\n" + table)


if __name__ == "__main__":
    main()
