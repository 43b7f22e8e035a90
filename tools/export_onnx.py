"""Export SAM as QDQ ONNX graphs (encoder.onnx, decoder.onnx, export.json) for ONNX Runtime / OpenVINO.

    # a quantized model saved by test_quant.py --save_sam_path (its q_config and flags are in the file)
    python tools/export_onnx.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py \\
        --load_sam_path work_dirs/w8a8.pth --out work_dirs/onnx_w8a8
    # the float model (the FP32 baseline of the deploy benchmark)
    python tools/export_onnx.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py --fp --out work_dirs/onnx_fp

Then evaluate the exported graphs through the same COCO pipeline:
    python ptq4sam/solver/test_quant.py --config ... --backend ort --onnx work_dirs/onnx_w8a8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam.errors import InputError, InputNotFound, check_writable_dir  # noqa: E402
from ptq4sam.solver.runner import load_config, run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the mmdet config of the model (gives the SAM type and weights)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--load_sam_path", "--load-sam-path", dest="load_sam_path",
                   help="compact quantized checkpoint (test_quant.py --save_sam_path)")
    g.add_argument("--fp", action="store_true", help="export the float model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--int4-weights", action="store_true",
                   help="store integer weights that fit 4 bits (W4 models) packed as INT4 / UINT4 (opset 21): half "
                        "the weight bytes; see docs/deploy.md for what each runtime does with them")
    p.add_argument("--u8-linear-weights", action="store_true",
                   help="store the Linear layers' 8-bit weights as uint8 (zero point 128, the same values): exact "
                        "integer kernels on CPUs without VNNI (AVX2), where uint8 x int8 pair sums saturate")
    p.add_argument("--float-linear-weights", action="store_true",
                   help="store the Linear layers' weights as the float values of their grid (4x the bytes): plain "
                        "float MatMuls, for models with float Linear inputs (q_config inputs.linear: float) on CPUs "
                        "without int8 dot products")
    p.add_argument("--float-conv-weights", action="store_true",
                   help="store the convolutions' weights as the float values of their grid (4x the bytes): plain "
                        "float convolutions, for models with float convolution inputs (q_config inputs.conv: float)")
    p.add_argument("--debug", action="store_true")
    return run_cli(run, p.parse_args(argv))


def run(args) -> None:
    from ptq4sam.deploy.onnx_export import export_sam  # noqa: PLC0415
    from ptq4sam.models import build_sam  # noqa: PLC0415

    cfg = load_config(args.config, {})
    out = check_writable_dir(args.out, "--out")
    m = cfg.model
    if m.get("type") != "DetWrapperInstanceSAM":
        raise InputError(f"{args.config}: model.type is {m.get('type')!r}; expected a DetWrapperInstanceSAM config")
    sam = build_sam(m.get("model_type", "lite_medsam"), m.get("sam_checkpoint"), random_init=m.get("random_init", False))
    q_config = quant_encoder = info = None
    if args.load_sam_path:
        from ptq4sam.checkpoint import load_quantized_file  # noqa: PLC0415

        if not Path(args.load_sam_path).is_file():
            raise InputNotFound(f"--load_sam_path: {args.load_sam_path} not found")
        qcfg, quant_encoder, info = load_quantized_file(sam, args.load_sam_path, torch.device("cpu"))
        q_config = qcfg.to_dict()
    res = export_sam(sam, out, sam.image_encoder.img_size, q_config, quant_encoder,
                     {"config": args.config, "load_sam_path": args.load_sam_path, "saved_run": info},
                     int4_weights=args.int4_weights, u8_linear_weights=args.u8_linear_weights,
                     float_linear_weights=args.float_linear_weights, float_conv_weights=args.float_conv_weights)
    man = res.manifest
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in man["file_bytes"].items())
    if args.int4_weights:
        sizes += "; 4-bit weights " + ", ".join(f"{k} {v['packed']} packed, {v['kept']} wider kept"
                                               for k, v in man["int4_weights"].items())
    print(f"wrote {out}: {sizes}; quantizers {man['quantizers']}"
          + (f"; emulated in float: {len(man['emulated'])} (AGQ / LNQ softmax, HLUQ)" if man["emulated"] else ""))


if __name__ == "__main__":
    sys.exit(main())
