"""Where does calibration time go in the MSE range searches? Times every 2-D (range x zero point) search of the MSE
observers while LiteMedSAM (encoder + decoder) is calibrated on the first --images calibration images (GT boxes, no
reconstruction), and prints the total and the slowest searches with their input shape (channels x values or bins).

    python tools/profile_observers.py --q-config exp/demo/config88.yaml --q-options ptq4sam.BIG=false \\
        ptq4sam.AGQ=false w_qconfig.symmetric=true a_qconfig.observer=AvgMSEObserver
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402
from ptq4sam.ptq import quantize_segmenter  # noqa: E402
from ptq4sam.qconfig import load_qconfig  # noqa: E402
from ptq4sam.quantization import observer  # noqa: E402
from ptq4sam.samples import gt_box_samples  # noqa: E402

DATA = ROOT / "data" / "coco128"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q-config", default="exp/demo/config88.yaml")
    p.add_argument("--q-options", nargs="*", default=[])
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    q = load_qconfig(a.q_config, [f"calibrate={a.images}", "recon.iters=0"] + a.q_options)
    samples = gt_box_samples(coco_eval.load_ann(DATA / "annotations/instances_calib32.json"), DATA / "train2017",
                             a.images)
    searches = []
    orig = observer.MSEObserver.search_2d

    def timed(self, values, weights, n, lo, hi):
        t = time.perf_counter()
        out = orig(self, values, weights, n, lo, hi)
        searches.append({"s": round(time.perf_counter() - t, 4), "shape": list(values.shape), "bit": self.bit,
                         "histogram": weights is not None, "observer": type(self).__name__})
        return out

    observer.MSEObserver.search_2d = timed
    try:
        seg = BoxPromptSegmenter(build_sam("lite_medsam"))
        t = time.perf_counter()
        quantize_segmenter(seg, samples, q, quant_encoder=True, device=torch.device("cpu"), log=lambda *x: None)
        total = time.perf_counter() - t
    finally:
        observer.MSEObserver.search_2d = orig
    searches.sort(key=lambda r: -r["s"])
    cmd = command_line("tools/profile_observers.py", argv)
    text = json.dumps({"command": cmd, "threads": a.threads, "images": a.images, "quantize_s": round(total, 2),
                       "searches": len(searches), "search_2d_s": round(sum(r["s"] for r in searches), 2),
                       "slowest": searches[:a.top]}, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
