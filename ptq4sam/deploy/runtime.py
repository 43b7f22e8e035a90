"""Run an exported SAM (:mod:`ptq4sam.deploy.onnx_export`) with ONNX Runtime or OpenVINO, behind the same
:class:`BoxPromptSegmenter` interface the evaluation uses (image preparation and mask post-processing stay the same
torch code; the image encoder and the prompt encoder + mask decoder run in the backend, the torch model's weights are
not used)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..errors import InputError
from ..models.segmenter import BoxPromptSegmenter
from .onnx_export import read_manifest

BACKENDS = ("ort", "openvino")
# ONNX Runtime fuses MatMul + Add into Gemm before its QDQ fusions run, which then leave the quantized Linear layers
# as DequantizeLinear + float Gemm: keep MatMul so they become MatMulIntegerToFloat (integer kernels)
ORT_DISABLED_OPTIMIZERS = ["MatMulAddFusion"]


def runtime_threads(threads: int) -> int:
    """Threads for a backend session: ``threads`` if > 0; else OMP_NUM_THREADS where set (the limit torch obeys: a
    process told to use one thread keeps ONNX Runtime / OpenVINO to one too, instead of one per core); else 0, the
    runtime's own default."""
    if threads:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 0


class _OrtGraph:
    def __init__(self, path: Path, threads: int, optimized_path: Optional[Path] = None, rewrite_depthwise: bool = True):
        import onnxruntime as ort  # noqa: PLC0415

        so = ort.SessionOptions()
        threads = runtime_threads(threads)
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        so.log_severity_level = 3
        self.rewritten_depthwise_inputs, src = 0, str(path)
        # per-channel activation QDQ of depthwise convolutions: a scalar loop in ONNX Runtime; the same values in
        # per-channel elementwise operators (conv_forms' docstring)
        if rewrite_depthwise:
            import onnx  # noqa: PLC0415

            from .conv_forms import fold_depthwise_input_qdq  # noqa: PLC0415

            model = onnx.load(str(path), load_external_data=False)
            # (not for a graph with external data: a large float one, which has no QDQ to rewrite)
            if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
                model, self.rewritten_depthwise_inputs = fold_depthwise_input_qdq(model)
                if self.rewritten_depthwise_inputs:
                    src = model.SerializeToString()
        self.sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"],
                                         disabled_optimizers=ORT_DISABLED_OPTIMIZERS)

    def __call__(self, feeds: Dict[str, np.ndarray]):
        return self.sess.run(None, feeds)


class _OvGraph:
    def __init__(self, path: Path, threads: int, extra_config: Optional[Dict] = None):
        import openvino as ov  # noqa: PLC0415

        cfg = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16 / f16 on CPUs that have it: compare like with like
        threads = runtime_threads(threads)
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        cfg.update(extra_config or {})
        self.model = ov.Core().compile_model(str(path), "CPU", cfg)
        self.req = self.model.create_infer_request()
        self.names = [o.get_any_name() for o in self.model.outputs]

    def __call__(self, feeds: Dict[str, np.ndarray]):
        res = self.req.infer(feeds)
        return [np.asarray(res[o]) for o in self.model.outputs]

    def runtime_precisions(self) -> Dict[str, int]:
        """{'<layer type>:<runtime precision>': count} of the compiled model. The precision of a node's data, not of
        its arithmetic: a ``FullyConnectedCompressed`` reads ``u8`` weights and multiplies in float (the kernel names
        of :mod:`.ov_profile` say what ran)."""
        out: Dict[str, int] = {}
        for op in self.model.get_runtime_model().get_ops():
            info = op.get_rt_info()
            k = f"{info['layerType'].astype(str)}:{info['runtimePrecision'].astype(str)}"
            out[k] = out.get(k, 0) + 1
        return out


def open_graph(path, backend: str, threads: int = 0):
    if backend == "ort":
        return _OrtGraph(Path(path), threads)
    if backend == "openvino":
        return _OvGraph(Path(path), threads)
    raise InputError(f"--backend: unknown backend {backend!r}, expected one of {BACKENDS}")


class OnnxSegmenter(BoxPromptSegmenter):
    """A :class:`BoxPromptSegmenter` whose encoder and decoder are the exported graphs of ``onnx_dir``.

    ``like``: the segmenter of the same SAM type built from the config (gives the image size, normalisation, SAM's
    pre / post-processing constants)."""

    def __init__(self, like: BoxPromptSegmenter, onnx_dir, backend: str, threads: int = 0):
        super().__init__(like.sam, like.mask_threshold, like._box_batch, like.normalize)
        self.manifest = read_manifest(onnx_dir)
        if self.manifest["img_size"] != self.img_size:
            raise InputError(f"--onnx {onnx_dir}: exported for {self.manifest['img_size']} px images, the config's "
                             f"SAM takes {self.img_size} px")
        missing = [p for p in ("encoder", "decoder") if p not in self.manifest["files"]]
        if missing:
            raise InputError(f"--onnx {onnx_dir}: the export has no {' / '.join(missing)} graph (export both)")
        self.backend = backend
        files = self.manifest["files"]
        if backend == "ort" and not all(files[p].endswith(".onnx") for p in ("encoder", "decoder")):
            raise InputError(f"--onnx {onnx_dir}: holds OpenVINO models ({files['encoder']}); use --backend openvino")
        self.encoder = open_graph(Path(onnx_dir) / files["encoder"], backend, threads)
        self.decoder = open_graph(Path(onnx_dir) / files["decoder"], backend, threads)

    @property
    def box_batch(self) -> int:
        return self._box_batch or 16  # one graph call per 16 boxes (the backend's own threads do the rest)

    def encode(self, image: np.ndarray):
        original_size = tuple(image.shape[:2])
        resized_hw = self.transform.get_preprocess_shape(original_size[0], original_size[1], self.img_size)
        x = self.prepare_image(image).contiguous().cpu().numpy()
        feats = self.encoder({"image": x})[0]
        return torch.from_numpy(np.ascontiguousarray(feats)), tuple(resized_hw), original_size

    def decode(self, features: torch.Tensor, boxes: torch.Tensor, original_size):
        boxes = self.transform.apply_boxes_torch(boxes.to(torch.float32), original_size)
        low, iou = self.decoder({"image_embeddings": features.numpy(), "boxes": boxes.cpu().numpy()})
        return torch.from_numpy(np.ascontiguousarray(low)), torch.from_numpy(np.ascontiguousarray(iou))[:, 0]
