"""The tools a user would otherwise quantize SAM with, on the same calibration data as ours: ONNX Runtime's
``quantize_static`` (QDQ) on the float ONNX graphs and NNCF's ``nncf.quantize`` on the OpenVINO models. Each writes a
folder with the same layout as :func:`ptq4sam.deploy.onnx_export.export_sam` (``export.json`` naming the graph files),
so ``test_quant.py --backend ... --onnx DIR`` and the deploy benchmark run them like ours."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..cpuinfo import int8_pairs_saturate
from .onnx_export import DECODER_FILE, ENCODER_FILE, read_manifest, write_manifest

ORT_METHODS = ("MinMax", "Entropy", "Percentile")


def _manifest(out: Path, fp_manifest: Dict, files: Dict[str, str], producer: str, settings: Dict, t: float) -> Dict:
    return write_manifest(out, files, fp_manifest["img_size"], {"producer": producer, **settings,
                                                                "w_qconfig": {"bit": 8}, "a_qconfig": {"bit": 8}},
                          True, quantize_s=round(time.time() - t, 1))


def ort_quantize_static(fp_dir, out_dir, calib: Dict[str, List[Dict[str, np.ndarray]]], method: str = "MinMax",
                        reduce_range: Optional[bool] = None) -> Dict:
    """W8A8 QDQ with ONNX Runtime's recommended CPU setting (uint8 activations, int8 per-channel weights).
    ``reduce_range`` (7-bit weights; None: where this CPU has no int8 dot product): ONNX Runtime's advice for CPUs
    without VNNI, whose uint8 x int8 kernels saturate 16-bit pair sums of full-range weights (without it, a W8A8 of a
    small SAM ViT-B lands at 55 % relative logit error on an AVX2 CPU, with it under 20 %)."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in ORT_METHODS:
        raise ValueError(f"method must be one of {ORT_METHODS}, got {method!r}")
    fp_dir, out = Path(fp_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp_man = read_manifest(fp_dir)
    if reduce_range is None:
        reduce_range = int8_pairs_saturate()
    t = time.time()

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    for part, f in ((("encoder", ENCODER_FILE), ("decoder", DECODER_FILE))):
        n = len(calib[part])
        # ranges / histograms merged every k samples (ORT otherwise keeps every intermediate output of all samples:
        # the decoder's Entropy calibration ran out of 24 GB); k must not divide n (ORT 1.31 raises "No data is
        # collected" when nothing is left over for its last merge)
        k = next((k for k in range(3, 64) if n % k), None) if n > 2 else None
        quantize_static(str(fp_dir / f), str(out / f), Reader(calib[part]), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method), reduce_range=reduce_range,
                        extra_options={"CalibMovingAverage": False,
                                       **({"CalibMaxIntermediateOutputs": k} if k else {})})
    return _manifest(out, fp_man, {"encoder": ENCODER_FILE, "decoder": DECODER_FILE},
                     "onnxruntime.quantization.quantize_static", {"calibrate_method": method, "per_channel": True,
                                                                  "format": "QDQ U8S8", "reduce_range": reduce_range},
                     t)


def nncf_quantize(fp_dir, out_dir, calib: Dict[str, List[Dict[str, np.ndarray]]]) -> Dict:
    """W8A8 with NNCF on the OpenVINO models, as NNCF recommends for transformers (``ModelType.TRANSFORMER``, mixed
    preset: symmetric weights, asymmetric activations)."""
    import nncf  # noqa: PLC0415
    import openvino as ov  # noqa: PLC0415

    fp_dir, out = Path(fp_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp_man = read_manifest(fp_dir)
    t = time.time()
    files = {}
    for part, f in ((("encoder", ENCODER_FILE), ("decoder", DECODER_FILE))):
        model = ov.Core().read_model(str(fp_dir / f))
        feeds = calib[part]
        q = nncf.quantize(model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.MIXED,
                          model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
        files[part] = f"{part}.xml"
        ov.save_model(q, str(out / files[part]), compress_to_fp16=False)
    return _manifest(out, fp_man, files, "nncf.quantize (OpenVINO)", {"preset": "MIXED", "model_type": "TRANSFORMER"},
                     t)
