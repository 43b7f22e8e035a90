"""Speed / memory benchmark: FP vs fake-quantized SAM (torch + numpy + segment_anything only, no mmcv/mmdet).

Per image: encoder ms and decoder ms (all boxes in one decoder batch), images/s; calibration time per image;
reconstruction cost per unit per iteration; peak memory (CUDA max_memory_allocated on GPU, RSS on CPU).
Random weights unless --checkpoint (or lite_medsam, whose weights ship with its package).

    python tools/benchmark_speed.py --model-type vit_b --image-size 1024 --boxes 1 300 --device cuda
    python tools/benchmark_speed.py --model-type lite_medsam --boxes 1 50
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402
from ptq4sam.ptq import quantize_segmenter  # noqa: E402
from ptq4sam.qconfig import load_qconfig  # noqa: E402
from ptq4sam.quant_sam import recon_units  # noqa: E402
from ptq4sam.quantization import freeze, unfreeze, use_compiled_agq  # noqa: E402
from ptq4sam.samples import CalibSample  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def random_boxes(n, h, w, rng):
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (n, 2))
    wh = rng.uniform(0.05, 0.2, (n, 2)) * [w, h]
    return np.concatenate([xy, np.minimum(xy + wh, [w - 1, h - 1])], 1).astype(np.float32)


@torch.no_grad()
def time_segmenter(seg, image, boxes_list, iters, device):
    """Median encoder ms, and per box count the median decoder ms (one batch of all boxes)."""
    enc_ms, dec_ms = [], {len(b): [] for b in boxes_list}
    for i in range(iters + 1):  # first round is warm-up
        sync(device)
        t = time.perf_counter()
        feats, _, orig = seg.encode(image)
        sync(device)
        if i:
            enc_ms.append((time.perf_counter() - t) * 1e3)
        for boxes in boxes_list:
            sync(device)
            t = time.perf_counter()
            seg.decode(feats, torch.as_tensor(boxes), orig)
            sync(device)
            if i:
                dec_ms[len(boxes)].append((time.perf_counter() - t) * 1e3)
    return statistics.median(enc_ms), {n: statistics.median(v) for n, v in dec_ms.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", default="lite_medsam", choices=["vit_b", "vit_l", "vit_h", "lite_medsam"])
    p.add_argument("--checkpoint", default=None, help="real weights (default: random, except lite_medsam)")
    p.add_argument("--image-size", type=int, default=None, help="encoder input size (default: the model's)")
    p.add_argument("--boxes", nargs="+", type=int, default=[1, 50])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--q-config", default=str(ROOT / "exp/demo/config66.yaml"))
    p.add_argument("--recon-iters", type=int, default=3)
    p.add_argument("--calib-images", type=int, default=2)
    p.add_argument("--decoder-only", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="also time fake-quant evaluation with the torch.compile-fused AGQ kernel (CUDA)")
    p.add_argument("--out", default=None, help="JSON file for the results (a .md table is written beside it)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    random_init = a.checkpoint is None and a.model_type != "lite_medsam"
    sam = build_sam(a.model_type, a.checkpoint, random_init=random_init, image_size=a.image_size).to(device)
    size = sam.image_encoder.img_size
    h, w = size * 3 // 4, size
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    boxes_list = [random_boxes(n, h, w, rng) for n in a.boxes]
    seg = BoxPromptSegmenter(sam, box_batch=max(a.boxes))
    res = {"model_type": a.model_type, "weights": "random" if random_init else (a.checkpoint or "package"),
           "image_size": size, "image_hw": [h, w], "boxes": a.boxes, "device": str(device),
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "q_config": a.q_config,
           "recon_iters": a.recon_iters, "quant_encoder": not a.decoder_only}
    reset_peak(device)
    enc, dec = time_segmenter(seg, image, boxes_list, a.iters, device)
    res["fp"] = {"encoder_ms": round(enc, 2), "decoder_ms": {n: round(v, 2) for n, v in dec.items()},
                 "peak_mem_mb": round(peak_mb(device), 1)}
    print("FP", json.dumps(res["fp"]))
    samples = [CalibSample(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), random_boxes(16, h, w, rng))
               for _ in range(a.calib_images)]
    qcfg = load_qconfig(a.q_config, [f"recon.iters={a.recon_iters}", f"calibrate={a.calib_images}",
                                     "ptq4sam.agq_images=1"])
    reset_peak(device)
    sync(device)
    t = time.perf_counter()
    info = quantize_segmenter(seg, samples, qcfg, not a.decoder_only, device, log=lambda *x: None).to_dict()
    sync(device)
    n_units = len(recon_units(sam, not a.decoder_only))
    res["ptq"] = {"total_s": round(time.perf_counter() - t, 2), "calibration_s_per_image":
                  round(info["calibration_s"] / a.calib_images, 3), "units": n_units,
                  "recon_ms_per_unit_iter": round(1e3 * info["reconstruction_s"] / max(1, n_units * a.recon_iters), 1),
                  "peak_mem_mb": round(peak_mb(device), 1)}
    print("PTQ", json.dumps(res["ptq"]))
    unfreeze(sam)  # the evaluation path without the frozen constants, to show what freeze() buys
    enc, dec = time_segmenter(seg, image, boxes_list, a.iters, device)
    res["fake_quant_unfrozen"] = {"encoder_ms": round(enc, 2), "decoder_ms": {n: round(v, 2) for n, v in dec.items()}}
    print("FQ unfrozen", json.dumps(res["fake_quant_unfrozen"]))
    freeze(sam)
    reset_peak(device)
    enc, dec = time_segmenter(seg, image, boxes_list, a.iters, device)
    res["fake_quant"] = {"encoder_ms": round(enc, 2), "decoder_ms": {n: round(v, 2) for n, v in dec.items()},
                         "peak_mem_mb": round(peak_mb(device), 1)}
    print("FQ", json.dumps(res["fake_quant"]))
    if a.compile:
        use_compiled_agq(True)
        enc, dec = time_segmenter(seg, image, boxes_list, a.iters, device)
        use_compiled_agq(False)
        res["fake_quant_compiled_agq"] = {"encoder_ms": round(enc, 2), "decoder_ms": {n: round(v, 2) for n, v in dec.items()}}
        print("FQ compiled AGQ", json.dumps(res["fake_quant_compiled_agq"]))
    ratios = {"encoder": round(res["fake_quant"]["encoder_ms"] / res["fp"]["encoder_ms"], 3)}
    for n in a.boxes:
        fp_img = res["fp"]["encoder_ms"] + res["fp"]["decoder_ms"][n]
        fq_img = res["fake_quant"]["encoder_ms"] + res["fake_quant"]["decoder_ms"][n]
        ratios[f"decoder_{n}"] = round(res["fake_quant"]["decoder_ms"][n] / res["fp"]["decoder_ms"][n], 3)
        ratios[f"per_image_{n}"] = round(fq_img / fp_img, 3)
        res.setdefault("images_per_s", {})[n] = {"fp": round(1e3 / fp_img, 2), "fake_quant": round(1e3 / fq_img, 2)}
    res["ratio_fake_quant_over_fp"] = ratios
    print("RATIO", json.dumps(ratios))
    md = [f"### {a.model_type} ({res['weights']} weights), {size}x{size} input, {res['gpu'] or 'CPU'}",
          "", "| boxes | FP enc ms | FP dec ms | FQ enc ms | FQ dec ms | FQ/FP per image | img/s FP | img/s FQ |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in a.boxes:
        md.append(f"| {n} | {res['fp']['encoder_ms']} | {res['fp']['decoder_ms'][n]} | {res['fake_quant']['encoder_ms']} "
                  f"| {res['fake_quant']['decoder_ms'][n]} | {ratios[f'per_image_{n}']} | "
                  f"{res['images_per_s'][n]['fp']} | {res['images_per_s'][n]['fake_quant']} |")
    md += ["", f"PTQ ({Path(a.q_config).name}, {a.calib_images} calib images, {a.recon_iters} iters/unit, "
               f"{n_units} units): calibration {res['ptq']['calibration_s_per_image']} s/image, reconstruction "
               f"{res['ptq']['recon_ms_per_unit_iter']} ms per unit-iteration; peak memory FP "
               f"{res['fp']['peak_mem_mb']} MB, PTQ {res['ptq']['peak_mem_mb']} MB, fake-quant eval "
               f"{res['fake_quant']['peak_mem_mb']} MB ({'max_memory_allocated' if device.type == 'cuda' else 'RSS'}).",
           "", "Without `freeze()` (weights re-quantized and quantizer constants prepared on every call): FQ enc "
               f"{res['fake_quant_unfrozen']['encoder_ms']} ms, FQ dec "
               + ", ".join(f"{n} boxes {res['fake_quant_unfrozen']['decoder_ms'][n]} ms" for n in a.boxes) + "."]
    if a.compile:
        fc = res["fake_quant_compiled_agq"]
        fp_ms = {n: res["fp"]["encoder_ms"] + res["fp"]["decoder_ms"][n] for n in a.boxes}
        md += ["", f"With the torch.compile-fused AGQ kernel (`--compile`): FQ enc {fc['encoder_ms']} ms, FQ dec "
                   + ", ".join(f"{n} boxes {fc['decoder_ms'][n]} ms (FQ/FP per image "
                               f"{(fc['encoder_ms'] + fc['decoder_ms'][n]) / fp_ms[n]:.3f})"
                               for n in a.boxes) + "."]
    print("\n".join(md))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
