"""How fast is the evaluation path's fake quantization? ``fake_quantize_affine`` (vectorised, ATen's values bit for
bit) against ATen's ``fake_quantize_per_tensor_affine`` on activation-sized tensors, then the quantized LiteMedSAM
image encoder (W8A8, MinMax ranges, calibrated on the first calibration image) encoding that image with each (their
embeddings must be equal). Times: medians of interleaved rounds (``ptq4sam.deploy.timing.interleaved_medians``).

    python tools/benchmark_fake_quant.py --threads 1 --out docs/results/cpu_speed/fake_quant.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.cpuinfo import cpu_info  # noqa: E402
from ptq4sam.deploy.timing import interleaved_medians  # noqa: E402
from ptq4sam.errors import command_line  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402
from ptq4sam.ptq import quantize_segmenter  # noqa: E402
from ptq4sam.qconfig import load_qconfig  # noqa: E402
from ptq4sam.quantization import fake_quant  # noqa: E402
from ptq4sam.samples import gt_box_samples  # noqa: E402

DATA = ROOT / "data" / "coco128"
SHAPES = [(1, 4096, 160), (1, 64, 128, 128), (1, 4096, 640)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ops = []
    s, z = torch.tensor([0.05]), torch.tensor([3], dtype=torch.int32)
    for shape in SHAPES:
        x = torch.randn(shape)
        t_aten, t_ours = interleaved_medians([lambda: fake_quant.aten_fake_quantize(x, s, z, 0, 255),
                                              lambda: fake_quant.fake_quantize_affine(x, s, z, 0, 255)], 1, a.repeats)
        ops.append({"shape": list(shape), "aten_ns_per_element": round(t_aten / x.numel() * 1e6, 2),
                    "ours_ns_per_element": round(t_ours / x.numel() * 1e6, 2), "speedup": round(t_aten / t_ours, 2)})
        print(ops[-1])
    q = load_qconfig("exp/demo/config88.yaml", ["calibrate=1", "recon.iters=0", "ptq4sam.BIG=false",
                                                "ptq4sam.AGQ=false", "w_qconfig.observer=MinMaxObserver",
                                                "a_qconfig.observer=MinMaxObserver"])
    samples = gt_box_samples(coco_eval.load_ann(DATA / "annotations/instances_calib32.json"), DATA / "train2017", 1)
    seg = BoxPromptSegmenter(build_sam("lite_medsam"))
    quantize_segmenter(seg, samples, q, quant_encoder=True, device=torch.device("cpu"), log=lambda *x: None)
    ours = fake_quant.fake_quantize_affine
    embeddings = {}

    def encode_with(name, fn):  # the encoder with one fake quantization in every uniform quantizer
        def run():
            fake_quant.fake_quantize_affine = fn
            try:
                embeddings[name] = seg.encode(samples[0].image)[0]
            finally:
                fake_quant.fake_quantize_affine = ours
        return run

    with torch.no_grad():
        ms = interleaved_medians([encode_with("aten", fake_quant.aten_fake_quantize), encode_with("ours", ours)], 1,
                                 a.repeats)
    model = {"aten": ms[0] / 1000, "ours": ms[1] / 1000}
    if not torch.equal(embeddings["aten"], embeddings["ours"]):
        raise SystemExit("the two fake quantizations gave different embeddings")
    out = {"command": command_line("tools/benchmark_fake_quant.py", argv),
           "threads": a.threads, "ops": ops, "encoder_w8a8_s": {k: round(v, 3) for k, v in model.items()},
           "encoder_speedup": round(model["aten"] / model["ours"], 2), "embeddings_equal": True, "cpu": cpu_info()}
    print(json.dumps({k: out[k] for k in ("encoder_w8a8_s", "encoder_speedup")}))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
