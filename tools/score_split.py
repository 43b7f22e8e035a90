"""Where does a quantized model's mask mAP go: its masks or its scores?

With box prompts the instance score is SAM's predicted IoU (times the detector score), and COCO mAP ranks every
mask of the split by it. This tool takes predictions saved by ``tools/benchmark_accuracy.py --save-predictions DIR``
(the FP model's and one or more quantized models', same images and prompts) and recomputes mask mAP with each
model's masks under each model's scores, plus (GT-box prompts) each mask's IoU with its own GT instance and how
well each model's score ranks its masks by that IoU.

    python tools/benchmark_accuracy.py --prompts gt --bits --save-predictions P --out-dir P   # FP predictions
    python tools/benchmark_accuracy.py --prompts gt --bits 4 --methods qdrop ptq4sam --fp-from ... --save-predictions P ...
    python tools/score_split.py --fp P/gt_fp.json --q P/gt_qdrop_w4.json P/gt_ptq4sam_w4.json --out P/split.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402


def markdown(rows) -> str:
    lines = ["| predictions | mask mAP | its masks, FP scores | FP masks, its scores | mean mask IoU with GT | "
             "masks with IoU >= 0.5 / >= 0.75 / < 0.1 | score-vs-IoU rank corr. | mean IoU with FP masks | "
             "mean abs SAM-IoU change |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    first = rows[0][1]
    gt = "mask_iou_to_gt_mean" in first

    def iou_cols(r, n):
        sh = r["mask_iou_to_gt_share"][n]
        return (f"{r['mask_iou_to_gt_mean'][n]:.4f} | {sh['0.5']:.3f} / {sh['0.75']:.3f} / {sh['<0.1']:.3f} | "
                f"{r['score_rank_corr_with_mask_iou'][n]:.3f}") if gt else " | | "
    lines.append(f"| FP | {first['segm_mAP']['fp']:.4f} | | | {iou_cols(first, 'fp')} | | |")
    for name, r in rows:
        m = r["segm_mAP"]
        iou = iou_cols(r, "q")
        lines.append(f"| {name} | {m['q']:.4f} | {m['q_masks_fp_scores']:.4f} | {m['fp_masks_q_scores']:.4f} | {iou} | "
                     f"{r['mask_iou_q_vs_fp_mean']:.4f} | {r['sam_iou_abs_diff_mean']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp", required=True, help="the FP model's predictions (JSON)")
    p.add_argument("--q", nargs="+", required=True, help="quantized models' predictions (JSON), same images / prompts")
    p.add_argument("--ann", default=str(ROOT / "data/coco128/annotations/instances_eval96.json"))
    p.add_argument("--out", default=None, help="write the split as JSON here (and a markdown table beside it)")
    a = p.parse_args(argv)
    fp = coco_eval.load_predictions(a.fp)
    rows = [(f"{Path(f).parent.name}/{Path(f).stem}",
             coco_eval.score_split(a.ann, fp, coco_eval.load_predictions(f), a.fp, f)) for f in a.q]
    table = markdown(rows)
    print(table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = command_line("tools/score_split.py", argv)
        out.write_text(json.dumps({"command": cmd, "fp": a.fp, "ann": a.ann, "runs": dict(rows)}, indent=1))
        out.with_suffix(".md").write_text(f"Command: `{cmd}`\n\n" + table)


if __name__ == "__main__":
    main()
