"""Which form of our quantized convolutions ONNX Runtime runs fastest on this machine (ptq4sam.deploy.conv_forms):
each form of an exported encoder beside the FP32 encoder (and the exported graph without the runner's rewrite of
per-channel depthwise inputs, conv_forms.fold_depthwise_input_qdq), timed in turn, with the kernels ONNX
Runtime's optimised graph runs and the output difference to the exported graph; a markdown table with the CPU's ISA,
optionally JSON.

    python tools/ort_conv_forms.py --onnx ONNX_DIR --fp FP32_ONNX_DIR [--json docs/results/deploy/ort_conv_forms.json]

ONNX_DIR / FP32_ONNX_DIR: folders written by tools/export_onnx.py (or tools/benchmark_deploy.py's --models-dir).
The inputs are the first --images calibration images (instances_calib32.json), prepared as the encoder expects.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ptq4sam.cpuinfo import cpu_info, describe  # noqa: E402
from ptq4sam.errors import InputError, command_line  # noqa: E402

AS_WRITTEN = "exported, per-channel depthwise QDQ as written"


def _images(n: int, size: int):
    import torch  # noqa: PLC0415

    from ptq4sam.coco_eval import load_ann  # noqa: PLC0415
    from ptq4sam.images import read_rgb  # noqa: PLC0415
    from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: PLC0415
    from ptq4sam.splits import IMAGES, split  # noqa: PLC0415

    seg = BoxPromptSegmenter(build_sam("lite_medsam"))
    if seg.sam.image_encoder.img_size != size:
        raise InputError(f"--onnx: an encoder for {size}x{size} images; this tool prepares LiteMedSAM's "
                         f"{seg.sam.image_encoder.img_size}x{seg.sam.image_encoder.img_size} inputs")
    ann = load_ann(split("calib").ann_file)
    out = []
    for im in sorted(ann["images"], key=lambda i: i["id"])[:n]:
        with torch.no_grad():
            out.append({"image": seg.prepare_image(read_rgb(IMAGES / im["file_name"])).numpy()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="our exported (quantized) graphs")
    ap.add_argument("--fp", required=True, help="the FP32 export of the same model")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=4, help="calibration images: output-QDQ ranges and the comparison")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15, help="timed inferences per form, in turn")
    args = ap.parse_args(argv)
    import onnx
    import onnxruntime as ort

    from ptq4sam.deploy.conv_forms import forms, quantized_convs
    from ptq4sam.deploy.onnx_export import ENCODER_FILE, read_manifest
    from ptq4sam.deploy.runtime import _OrtGraph
    from ptq4sam.deploy.timing import interleaved_medians

    size = read_manifest(args.onnx)["img_size"]
    model = onnx.load(Path(args.onnx) / ENCODER_FILE)
    if not quantized_convs(model.graph):
        raise InputError(f"--onnx {args.onnx}: its encoder has no quantized convolution (QDQ input, integer weight)")
    feeds = _images(args.images, size)
    models = {"FP32": onnx.load(Path(args.fp) / ENCODER_FILE), **forms(model, feeds)}
    rows, graphs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        models[AS_WRITTEN] = model  # without the runner's rewrite
        for name, m in models.items():
            path, opt = Path(tmp) / f"{len(graphs)}.onnx", Path(tmp) / f"{len(graphs)}_opt.onnx"
            onnx.save(m, path)
            graphs[name] = _OrtGraph(path, args.threads, optimized_path=opt, rewrite_depthwise=name != AS_WRITTEN)
            ops = [n.op_type for n in onnx.load(opt).graph.node]
            kernels = {k: ops.count(k) for k in ("Conv", "FusedConv", "QLinearConv", "ConvInteger", "DequantizeLinear",
                                                 "QuantizeLinear", "MatMulIntegerToFloat") if ops.count(k)}
            rows.append({"form": name, "ort_kernels": kernels})
        ref = [graphs["exported"](f)[0] for f in feeds]
        for r in rows:
            out = [graphs[r["form"]](f)[0] for f in feeds]
            r["max_abs_diff_vs_exported"] = float(max(np.abs(a - b).max() for a, b in zip(out, ref)))
            r["mean_abs_diff_vs_exported"] = float(np.mean([np.abs(a - b).mean() for a, b in zip(out, ref)]))
        medians = interleaved_medians([lambda g=g: g(feeds[0]) for g in graphs.values()], args.warmup, args.repeats)
        times = dict(zip(graphs, medians))
    fp_ms = times["FP32"]
    for r in rows:
        r["ms"] = round(times[r["form"]], 1)
        r["speedup_vs_fp32"] = round(fp_ms / r["ms"], 3)
    cpu = cpu_info()
    print(f"CPU: {describe(cpu)}; onnxruntime {ort.__version__}; {args.threads} threads; encoder {size}x{size}; "
          f"medians of {args.repeats}, forms timed in turn\n")
    print("| form | ms | vs FP32 | ONNX Runtime kernels | max / mean abs diff to exported |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        k = ", ".join(f"{a} x{b}" for a, b in r["ort_kernels"].items())
        print(f"| {r['form']} | {r['ms']} | {r['speedup_vs_fp32']}x | {k} | {r['max_abs_diff_vs_exported']:.4f} / "
              f"{r['mean_abs_diff_vs_exported']:.5f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "cpu": cpu, "onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats,
            "onnx": args.onnx, "fp": args.fp, "rows": rows,
            "command": command_line("tools/ort_conv_forms.py", argv)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
