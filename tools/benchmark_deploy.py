"""Deploy benchmark: FP32 and W8A8 SAM as ONNX graphs on ONNX Runtime and OpenVINO, ours beside the peers.

One run, same machine, same threads, same inputs: for every (model, backend) the encoder ms (one image), the decoder ms
with 1 and 50 boxes (medians of --repeats rounds after --warmup; each round times every model of a backend once, so a
slow spell of the machine touches all of them alike), the size on disk, and (unless --no-accuracy) the mask mAP on
the LiteMedSAM GT-box evaluation split through the same evaluation code as tools/benchmark_accuracy.py.

Models: the float export, ours (compact checkpoints from ``test_quant.py --save_sam_path`` or
``benchmark_accuracy.py --save-dir``, exported here) and the peers, quantized here on the same calibration images (the
first --calibrate images by id of instances_calib32.json with their GT boxes): ONNX Runtime ``quantize_static`` (QDQ,
U8S8 per channel; --ort-methods) and NNCF ``nncf.quantize`` (OpenVINO, transformer model type, mixed preset).

    python tools/benchmark_deploy.py --ours "W8A8 PTQ4SAM=work_dirs/w8a8.pth" --out-dir docs/results/deploy
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.cpuinfo import cpu_info, describe, int8_pairs_saturate  # noqa: E402
from ptq4sam.deploy.onnx_export import MANIFEST_FILE, export_sam, read_manifest  # noqa: E402
from ptq4sam.deploy.runtime import OnnxSegmenter, open_graph  # noqa: E402
from ptq4sam.deploy.timing import decoder_boxes, interleaved_medians  # noqa: E402
from ptq4sam.errors import InputError, InputNotFound, command_line  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402

DATA = ROOT / "data" / "coco128"


def time_models(models, x: np.ndarray, boxes: dict, threads: int, warmup: int, repeats: int, open_fn=open_graph):
    """One row per (model, backend) of ``models`` (``(name, dir, backends)``): its encoder ms on ``x`` and decoder ms
    on each ``boxes[n]``, or the error that kept it from compiling. Each backend's models are timed together in
    interleaved rounds (:func:`interleaved_medians`), one backend after the other: the speed-ups compare models on one
    backend, and a runtime's threads still spinning after its call must not land on another runtime's timing. Only
    one backend's graphs are open at a time (with their 50-box buffers, every graph of a run at once took 19 GB)."""
    rows, plan = [], {}  # plan: backend -> [(row, dir, manifest)], rows in the order of ``models``
    for name, d, backends in models:
        man = read_manifest(d)
        for backend in backends:
            rows.append({"model": name, "backend": backend, "dir": str(d)})
            plan.setdefault(backend, []).append((rows[-1], d, man))
    for backend, items in plan.items():
        _time_backend(backend, items, x, boxes, threads, warmup, repeats, open_fn)
    return rows


def _time_backend(backend: str, items, x: np.ndarray, boxes: dict, threads: int, warmup: int, repeats: int,
                  open_fn) -> None:
    """Open, time and close one backend's graphs (:func:`time_models`), filling each item's row."""
    tasks = []  # [(row, key, call)]
    for row, d, man in items:
        try:
            enc = open_fn(d / man["files"]["encoder"], backend, threads)
            dec = open_fn(d / man["files"]["decoder"], backend, threads)
        except RuntimeError as e:  # e.g. OpenVINO failing to compile another tool's QDQ graph: a row says so
            msg = " ".join(str(e).split())[:300]
            row["error"] = msg
            print(f"{row['model']} on {backend}: cannot run: {msg}", file=sys.stderr)
            continue
        feats = enc({"image": x})[0]
        row["bytes"] = sum(man["file_bytes"].values())
        tasks.append((row, "encoder_ms", lambda enc=enc: enc({"image": x})))
        for n, b in boxes.items():
            tasks.append((row, f"decoder_ms_{n}",
                          lambda dec=dec, feats=feats, b=b: dec({"image_embeddings": feats, "boxes": b})))
        if backend == "openvino":
            row["ov_precisions"] = {k: v for k, v in enc.runtime_precisions().items()
                                    if k.split(":")[0] in ("Convolution", "FullyConnected", "MatMul")}
    for (row, key, _), ms in zip(tasks, interleaved_medians([c for _, _, c in tasks], warmup, repeats)):
        row[key] = round(ms, 2)


def slug(name: str) -> str:
    """A file-name form of a model name: letters and digits kept, everything else '_'."""
    return "".join(c if c.isalnum() else "_" for c in name)


def calibration_feeds(fp_dir: Path, n: int, max_boxes: int):
    """Encoder inputs of the first n calibration images; decoder inputs = their FP embeddings (FP export, ORT) with
    at most ``max_boxes`` GT boxes each, 4 boxes per sample (the peers' calibrators keep intermediate outputs)."""
    seg = BoxPromptSegmenter(build_sam("lite_medsam"))
    ann = coco_eval.load_ann(DATA / "annotations/instances_calib32.json")
    prompts = coco_eval.gt_prompts(ann)
    enc = open_graph(fp_dir / "encoder.onnx", "ort")
    feeds = {"encoder": [], "decoder": []}
    for im in coco_eval.first_images(ann, n):
        img = coco_eval.read_rgb(DATA / "train2017" / im["file_name"])
        x = seg.prepare_image(img).contiguous().numpy()
        feeds["encoder"].append({"image": x})
        boxes = torch.as_tensor(prompts[im["id"]][0][:max_boxes])
        if len(boxes):
            tb = seg.transform.apply_boxes_torch(boxes, img.shape[:2]).numpy()
            emb = enc({"image": x})[0]
            feeds["decoder"] += [{"image_embeddings": emb, "boxes": tb[i:i + 4]} for i in range(0, len(tb), 4)]
    return feeds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", nargs="*", default=[], metavar="NAME=CKPT", help="compact checkpoints to export and run")
    p.add_argument("--peers", nargs="*", default=["ort_static", "nncf"], choices=["ort_static", "nncf"])
    p.add_argument("--ort-methods", nargs="+", default=["MinMax"], choices=["MinMax", "Entropy", "Percentile"])
    p.add_argument("--u8-linear-weights", choices=["auto", "on", "off"], default="auto",
                   help="export our Linear weights as uint8 (zero point 128): 'auto' = where this CPU has no int8 "
                        "dot product (AVX2 without VNNI: uint8 x int8 pair sums saturate there)")
    p.add_argument("--float-linear-weights", choices=["auto", "on", "off"], default="auto",
                   help="export our Linear weights as the float values of their grid instead (4x their bytes, plain "
                        "float MatMuls): 'auto' = for models whose Linear inputs are float (q_config inputs.linear: "
                        "float; their integer weights would run as decompressing or input-quantizing kernels); "
                        "overrides --u8-linear-weights")
    p.add_argument("--float-conv-weights", choices=["auto", "on", "off"], default="auto",
                   help="export our convolution weights as the float values of their grid (4x their bytes, plain float "
                        "convolutions): 'auto' = for models whose convolution inputs are float (q_config inputs.conv: "
                        "float; the runtimes would dequantize their integer weights at every run)")
    p.add_argument("--calibrate", type=int, default=16)
    p.add_argument("--calib-boxes", type=int, default=16, help="boxes per calibration image for the decoders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--eval-images", type=int, default=None, help="first N evaluation images (default: all 96)")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--accuracy-from", nargs="+", default=None, metavar="JSON",
                   help="with --no-accuracy: take each (model, backend)'s mask mAP from these deploy.json files of "
                        "earlier runs on the same graphs (the timings taken again, e.g. on an idle machine)")
    p.add_argument("--reuse-models", action="store_true",
                   help="keep the graphs already in --models-dir (same --ours checkpoints and peers) instead of "
                        "exporting / quantizing them again, e.g. to take the timings again on an idle machine")
    p.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="also write each (model, backend)'s evaluation predictions here as JSON, for "
                        "tools/compare_predictions.py (paired bootstrap) and tools/score_split.py")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "results" / "deploy"))
    p.add_argument("--models-dir", default=str(ROOT / "work_dirs" / "deploy_models"),
                   help="where the exported / peer-quantized graphs go")
    a = p.parse_args(argv)
    if a.accuracy_from and not a.no_accuracy:
        p.error("--accuracy-from goes with --no-accuracy")
    out, mdir = Path(a.out_dir), Path(a.models_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    env = {"command": command_line("tools/benchmark_deploy.py", argv),
           "cpu": describe(cpu_info()), "cpu_isa": cpu_info(), "threads": a.threads, "torch": torch.__version__,
           "timing": f"medians of {a.repeats} interleaved rounds (each model of a backend once per round; one backend "
                     f"after the other) after {a.warmup} warm-up calls each",
           "split": "eval = data/coco128 instances_eval96.json, GT boxes; calibration = first "
                    f"{a.calibrate} images by id of instances_calib32.json"}
    import onnxruntime  # noqa: PLC0415
    import openvino  # noqa: PLC0415

    env.update(onnxruntime=onnxruntime.__version__, openvino=openvino.__version__)
    sam = build_sam("lite_medsam")
    models = []  # (name, dir, backends)
    fp_dir = mdir / "fp32"
    img_size = sam.image_encoder.img_size
    def have(d: Path) -> bool:
        return a.reuse_models and (d / MANIFEST_FILE).is_file()

    if not have(fp_dir):
        export_sam(sam, fp_dir, img_size, info={"model": "lite_medsam float"})
    models.append(("FP32", fp_dir, ("ort", "openvino")))
    from ptq4sam.checkpoint import load_quantized_file  # noqa: PLC0415

    u8_cpu = a.u8_linear_weights == "on" or (a.u8_linear_weights == "auto" and int8_pairs_saturate())

    def weight_storage(q_config: Dict) -> Tuple[bool, bool, bool]:  # (u8 Linear, float Linear, float conv) weights
        inputs = q_config.get("inputs") or {}
        fl = a.float_linear_weights == "on" or (a.float_linear_weights == "auto" and inputs.get("linear") == "float")
        fc = a.float_conv_weights == "on" or (a.float_conv_weights == "auto" and inputs.get("conv") == "float")
        return u8_cpu and not fl, fl, fc

    for spec in a.ours:
        name, _, ckpt = spec.partition("=")
        d = mdir / ("ours_" + slug(name))
        if have(d):
            man = read_manifest(d)
            u8, fl, fc = weight_storage(man.get("q_config") or {})
            was = man.get("info", {}).get("checkpoint")
            if was != ckpt:
                raise InputError(f"--reuse-models: {d} was exported from {was!r}, not from {ckpt!r} "
                                 "(another --models-dir, or drop --reuse-models)")
            for key, want, flag in (("u8_linear_weights", u8, f"--u8-linear-weights {a.u8_linear_weights}"),
                                    ("float_linear_weights", fl, f"--float-linear-weights {a.float_linear_weights}"),
                                    ("float_conv_weights", fc, f"--float-conv-weights {a.float_conv_weights}")):
                if bool(man.get(key)) != want:
                    raise InputError(f"--reuse-models: {d} was exported with {key}={bool(man.get(key))}, this run "
                                     f"asks for {want} ({flag}; drop --reuse-models or pass the setting it was made "
                                     "with)")
        else:
            qsam = build_sam("lite_medsam")
            qcfg, qenc, _ = load_quantized_file(qsam, ckpt, torch.device("cpu"))
            q_dict = qcfg.to_dict()
            u8, fl, fc = weight_storage(q_dict)
            export_sam(qsam, d, img_size, q_dict, qenc, {"checkpoint": ckpt}, u8_linear_weights=u8,
                       float_linear_weights=fl, float_conv_weights=fc)
        models.append((f"ours {name}", d, ("ort", "openvino")))
    if a.peers:
        from ptq4sam.deploy import peers  # noqa: PLC0415

        feeds = None
        if "ort_static" in a.peers:
            for method in a.ort_methods:
                d = mdir / f"ort_static_{method.lower()}"
                if not have(d):
                    feeds = feeds or calibration_feeds(fp_dir, a.calibrate, a.calib_boxes)
                    peers.ort_quantize_static(fp_dir, d, feeds, method)
                models.append((f"ORT quantize_static W8A8 ({method})", d, ("ort", "openvino")))
        if "nncf" in a.peers:
            d = mdir / "nncf"
            if not have(d):
                feeds = feeds or calibration_feeds(fp_dir, a.calibrate, a.calib_boxes)
                peers.nncf_quantize(fp_dir, d, feeds)
            models.append(("NNCF W8A8 (transformer, mixed)", d, ("openvino",)))

    like = BoxPromptSegmenter(sam)
    rng = np.random.default_rng(0)
    x = like.prepare_image((rng.random((img_size, img_size, 3)) * 255).astype(np.uint8)).contiguous().numpy()
    boxes = {n: decoder_boxes(n, rng) for n in (1, 50)}
    ev_file = DATA / "annotations/instances_eval96.json"
    prompts = coco_eval.gt_prompts(coco_eval.load_ann(ev_file))
    timing_done = out / "timing_done"  # (a marker: other work may share the CPU once the timings are taken)
    timing_done.unlink(missing_ok=True)
    rows = time_models(models, x, boxes, a.threads, a.warmup, a.repeats)  # all timings first; the accuracy after
    for row in rows:
        print(json.dumps(row))
    if a.accuracy_from:
        env["accuracy_from"] = " ".join(a.accuracy_from)
        copy_accuracy(rows, a.accuracy_from)
    write(out, env, rows)
    timing_done.write_text("timings taken\n")
    if not a.no_accuracy:
        for row in rows:
            if "error" in row:
                continue
            t = time.time()
            seg = OnnxSegmenter(like, row["dir"], row["backend"], a.threads)
            pred = None
            if a.save_predictions:
                pred = Path(a.save_predictions) / f"{slug(row['model'])}_{row['backend']}.json"
                row["predictions"] = str(pred)
            row.update(coco_eval.evaluate(seg, ev_file, DATA / "train2017", prompts, max_images=a.eval_images,
                                          desc=f"{row['model']} {row['backend']}", save_predictions=pred))
            row["eval_s"] = round(time.time() - t, 1)
            print(json.dumps(row))
            write(out, env, rows)
    print(f"wrote {out / 'deploy.json'}, {out / 'deploy.md'}")


ACCURACY_KEYS = ("segm_mAP", "segm_mAP_50", "segm_mAP_75", "num_images", "predictions", "eval_s")


def copy_accuracy(rows, paths: List[str]):
    """Mask mAP of each (model, backend) row from earlier deploy.json files; a row none of them has, or two of them
    with different numbers, is an error."""
    old: Dict[Tuple[str, str], Dict] = {}
    for path in paths:
        f = Path(path)
        if not f.is_file():
            raise InputNotFound(f"--accuracy-from {path}: no such file")
        try:
            got = {(r["model"], r["backend"]): r for r in json.loads(f.read_text())["rows"] if "segm_mAP" in r}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"--accuracy-from {path}: not a deploy.json of tools/benchmark_deploy.py ({e})") from None
        for k, r in got.items():
            if k in old and old[k]["segm_mAP"] != r["segm_mAP"]:
                raise InputError(f"--accuracy-from: {k[0]!r} on {k[1]} has mask mAP {old[k]['segm_mAP']} in "
                                 f"{old[k]['_from']} and {r['segm_mAP']} in {path}")
            old[k] = dict(r, _from=path)
    for r in rows:
        if "error" in r:
            continue
        o = old.get((r["model"], r["backend"]))
        if o is None:
            raise InputError(f"--accuracy-from {' '.join(paths)}: no mask mAP for {r['model']!r} on {r['backend']}")
        r.update({k: o[k] for k in ACCURACY_KEYS if k in o})


def write(out: Path, env, rows):
    (out / "deploy.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    fp = {r["backend"]: r for r in rows if r["model"] == "FP32"}
    lines = [f"Command: `{env['command']}`  ", f"CPU: {env['cpu']}, {env['threads']} threads; onnxruntime "
             f"{env['onnxruntime']}, openvino {env['openvino']}  ", f"Split: {env['split']}  "]
    if env.get("timing"):
        lines.append(f"Timing: {env['timing']}  ")
    if env.get("accuracy_from"):
        lines.append(f"Mask mAP from: {env['accuracy_from']} (the same graphs, evaluated in an earlier run)  ")
    lines += ["",
             "| model | backend | mask mAP | % of FP | encoder ms | decoder ms (1 / 50 boxes) | encoder speedup vs FP32 "
             "(same backend) | size MB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['backend']} | fails to compile: {r['error'][:120]} | | | | | |")
            continue
        f = fp.get(r["backend"])
        acc = f"{r['segm_mAP']:.4f}" if "segm_mAP" in r else "-"
        pct = (f"{100 * r['segm_mAP'] / f['segm_mAP']:.1f}" if f and "segm_mAP" in r and "segm_mAP" in f else "-")
        sp = f"{f['encoder_ms'] / r['encoder_ms']:.2f}x" if f else "-"
        lines.append(f"| {r['model']} | {r['backend']} | {acc} | {pct} | {r['encoder_ms']:.1f} | "
                     f"{r['decoder_ms_1']:.1f} / {r['decoder_ms_50']:.1f} | {sp} | {r['bytes'] / 2**20:.1f} |")
    (out / "deploy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
