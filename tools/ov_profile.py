"""Where OpenVINO spends the time of exported SAM graphs, and which kernels ran in integers (ptq4sam.deploy.ov_profile):
per model and part, the time summed by (layer type, kernel) from OpenVINO's performance counters; a markdown table with
the CPU's ISA, optionally JSON.

    python tools/ov_profile.py --model FP32=DIR --model ours=DIR [--part encoder decoder] [--boxes 50] \
        [--json docs/results/deploy_avx2/ov_profile.json]

DIR: a folder written by tools/export_onnx.py or tools/benchmark_deploy.py's --models-dir (ONNX or OpenVINO IR). The
encoder runs on a random image prepared as the encoder expects, the decoder on that model's own image embedding with
--boxes boxes in one call (as tools/benchmark_deploy.py times them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ptq4sam.cpuinfo import cpu_info, describe  # noqa: E402
from ptq4sam.errors import InputError, command_line  # noqa: E402

# the layers whose multiply-adds an int8 kernel would speed up (elementwise Subgraphs that quantize are left out)
MATMUL_LIKE = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "FullyConnected",
               "FullyConnectedCompressed", "FullyConnectedQuantizedLegacy", "MatMul")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="an exported model (repeat)")
    ap.add_argument("--part", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    ap.add_argument("--boxes", type=int, default=50, help="boxes per decoder call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="timed runs (the counters are averaged)")
    ap.add_argument("--top", type=int, default=12, help="rows shown per model and part")
    ap.add_argument("--json", help="also write every row here")
    a = ap.parse_args(argv)
    import openvino as ov  # noqa: PLC0415

    from ptq4sam.deploy.onnx_export import read_manifest  # noqa: PLC0415
    from ptq4sam.deploy.ov_profile import integer_share, profile  # noqa: PLC0415
    from ptq4sam.deploy.runtime import open_graph  # noqa: PLC0415
    from ptq4sam.deploy.timing import decoder_boxes  # noqa: PLC0415

    models = []
    for spec in a.model:
        name, sep, d = spec.partition("=")
        if not sep or not Path(d).is_dir():
            raise InputError(f"--model {spec}: expected NAME=DIR with DIR an exported model's folder")
        models.append((name, Path(d), read_manifest(d)))
    size = models[0][2]["img_size"]
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    boxes = decoder_boxes(a.boxes, rng, size / 256)
    cpu = cpu_info()
    print(f"CPU: {describe(cpu)}; OpenVINO {ov.__version__}; {a.threads} threads; decoder: {a.boxes} boxes per call\n")
    results = []
    for name, d, man in models:
        files = man["files"]
        emb = open_graph(d / files["encoder"], "openvino", a.threads)({"image": image})[0]
        feeds = {"encoder": {"image": image}, "decoder": {"image_embeddings": emb, "boxes": boxes}}
        for part in a.part:
            res = profile(d / files[part], feeds[part], a.threads, a.runs)
            share = integer_share(res["rows"], MATMUL_LIKE)
            results.append({"model": name, "dir": str(d), "part": part, **res, "matmul_like_nodes": share})
            print(f"### {name}, {part}: {res['wall_ms']} ms (median wall time; {res['total_ms']} ms in the counters); "
                  f"convolutions / matrix multiplies in integer kernels: "
                  f"{share['integer']} of {share['integer'] + share['float']}\n")
            print("| layer type | kernel | nodes | ms | integer |\n| --- | --- | --- | --- | --- |")
            for r in res["rows"][:a.top]:
                print(f"| {r['layer_type']} | {r['exec_type']} | {r['nodes']} | {r['ms']:.1f} | "
                      f"{'yes' if r['integer'] else ''} |")
            print()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"cpu": cpu, "openvino": ov.__version__, "threads": a.threads,
                                            "boxes": a.boxes, "runs": a.runs,
                                            "command": command_line("tools/ov_profile.py", argv),
                                            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
