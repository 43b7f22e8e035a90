"""The test_quant.py job: build config, data and model, (quantize), evaluate, write metrics.json."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ptq4sam.errors import (
    ImageReadError,
    InputError,
    InputNotFound,
    UnknownName,
    WorkDirError,
    atomic_write,
    atomic_write_text,
    check_writable_dir,
    run_cli,
)
from ptq4sam.methods.layer_inputs import label_note
from ptq4sam.progress import PhaseTimer, progress
from ptq4sam.solver.data import build_eval_dataset, collate_one

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cfg_options_action():
    """mmcv's ``DictAction`` (``key=value``, values as Python literals / lists), whose malformed input (no ``=``,
    unbalanced brackets) is argparse's one-line usage error instead of an AssertionError / ValueError traceback."""
    from mmcv import DictAction  # noqa: PLC0415

    class CfgOptions(DictAction):
        def __call__(self, parser, namespace, values, option_string=None):
            for kv in values:
                if "=" not in kv or not all(kv.split("=", 1)[0].split(".")):  # no '=', an empty key or key part
                    raise argparse.ArgumentError(self, f"expected key=value with a dotted key (e.g. "
                                                       f"data.test.ann_file=FILE), got {kv!r}")
            try:
                super().__call__(parser, namespace, values, option_string)
            except (AssertionError, ValueError) as e:  # mmcv's parser: unbalanced brackets and the like
                raise argparse.ArgumentError(self, f"cannot read {' '.join(values)!r}: {e}") from None

    return CfgOptions


def _bounded(kind, lo=None, hi=None, what="a number"):
    """An argparse type: ``kind(text)`` within [lo, hi] (NaN refused), else argparse's one-line usage error."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected {what} {span}, got {text!r}")
        return v
    parse.__name__ = what  # argparse names the type in its messages
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PTQ4SAM: quantize and evaluate a box-prompted SAM on COCO")
    p.add_argument("--config", required=True, help="mmdet config (projects/configs/...)")
    p.add_argument("--q_config", "--q-config", dest="q_config", default=None, help="quantization yaml (exp/...)")
    p.add_argument("--quant-encoder", action="store_true", help="also quantize the SAM image encoder")
    p.add_argument("--fp", action="store_true", help="evaluate the full-precision model (no quantization)")
    p.add_argument("--fp-baseline", action="store_true", help="evaluate FP too and print it beside the quantized")
    p.add_argument("--no-fp-cache", action="store_true",
                   help="evaluate the FP baseline even if the same evaluation is cached in work_dirs/.fp_cache/")
    p.add_argument("--work-dir", default=None, help="where metrics.json goes (default work_dirs/<config name>)")
    p.add_argument("--eval", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"],
                   help="COCO metrics to evaluate")
    p.add_argument("--out", default=None, help="also dump the raw results to this .pkl")
    p.add_argument("--show", action="store_true", help="show results in a window (needs a display)")
    p.add_argument("--show-dir", default=None, help="write one PNG per image with masks, boxes, labels, scores")
    p.add_argument("--show-score-thr", type=_bounded(float, 0.0, 1.0, "a score"), default=0.3)
    p.add_argument("--cfg-options", nargs="+", action=_cfg_options_action(), default={},
                   help="override config keys, e.g. data.test.ann_file=... data.calib.img_prefix=...")
    p.add_argument("--q-options", nargs="+", default=[], help="override q_config keys, e.g. recon.iters=200")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    p.add_argument("--gpu-id", type=_bounded(int, 0, what="a GPU index"), default=0)
    p.add_argument("--seed", type=_bounded(int, 0, 2 ** 32 - 1, "an integer seed"), default=None,
                   help="default: the q_config's seed, else 0")
    p.add_argument("--max-images", type=_bounded(int, 1, what="a number of images"), default=None,
                   help="evaluate only the first N images (debugging)")
    p.add_argument("--save_sam_path", "--save-sam-path", dest="save_sam_path", default=None)
    p.add_argument("--load_sam_path", "--load-sam-path", dest="load_sam_path", default=None)
    p.add_argument("--paper-eval-bugs", "--legacy-eval-drop", dest="paper_eval_bugs", action="store_true",
                   help="reproduce the paper code's two evaluation leaks (to compare with its numbers): layer-input "
                        "quantizers left at QDrop's drop probability 0.5 and only the first AdaRound layer of each "
                        "reconstruction unit hardened (the others keep soft rounding); recorded in metrics.json")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted quantization from <work-dir>/recon_state.pt (saved after calibration "
                        "and after every reconstruction unit); the result is identical to an uninterrupted run")
    p.add_argument("--backend", choices=["torch", "ort", "openvino"], default="torch",
                   help="run SAM as exported ONNX graphs (--onnx DIR, tools/export_onnx.py) with ONNX Runtime or "
                        "OpenVINO instead of the torch model")
    p.add_argument("--onnx", default=None, help="folder of tools/export_onnx.py (with --backend ort|openvino)")
    p.add_argument("--threads", type=_bounded(int, 0, 4096, "a number of threads"), default=0,
                   help="backend threads (--backend ort|openvino; 0: OMP_NUM_THREADS if set, else the backend's default)")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors too (they print one line)")
    p.add_argument("--compile-agq", action="store_true",
                   help="evaluate AGQ with a torch.compile-fused kernel on CUDA (faster; last-bit differences possible)")
    args = p.parse_args(argv)
    if not args.fp and not args.q_config and args.backend == "torch":
        p.error("give --q_config for quantization, --fp to evaluate the float model, or --backend ort|openvino --onnx DIR")
    return args


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_dist(launcher: str):
    if launcher == "none":
        return 0, 1
    import torch.distributed as dist  # noqa: PLC0415

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def pick_device(gpu_id: int, launcher: str) -> torch.device:
    if torch.cuda.is_available():
        idx = int(os.environ.get("LOCAL_RANK", gpu_id)) if launcher != "none" else gpu_id
        return torch.device("cuda", idx % torch.cuda.device_count())
    return torch.device("cpu")


def load_config(path: str, options: dict):
    from mmcv import Config  # noqa: PLC0415

    if Path(path).is_dir():
        raise InputError(f"--config {path}: is a folder; expected an mmdet config file (projects/configs/.../*.py)")
    if not Path(path).is_file():
        raise InputNotFound(f"config not found: {path}")
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as e:  # mmcv re-raises the parser's error with its own message (and no line number)
        where = f"line {e.lineno}: " if e.lineno else ""
        raise InputError(f"{path}: {where}not valid Python ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); expected an mmdet config (Python)") from None
    check_structure(cfg, path)
    if options:
        check_cfg_options(cfg, options, path)
        cfg.merge_from_dict(options)
        check_structure(cfg, f"{path} with --cfg-options")
    import projects.instance_segment_anything  # noqa: F401,PLC0415  (registers the plugin)

    prompt = cfg.model.get("prompt")
    if isinstance(prompt, dict) and prompt.get("type") in ("gt", "json") and not prompt.get("ann_file"):
        # GT / cached-detection prompts are looked up in the dataset's own annotation files
        prompt.ann_file = [cfg.data.test.ann_file] + ([cfg.data.calib.ann_file] if "calib" in cfg.data else [])
    return cfg


def check_structure(cfg, where: str) -> None:
    """The parts of an mmdet config this toolkit reads: ``model`` (a dict with ``type``) and ``data.test`` (a dict with
    ``ann_file`` and ``img_prefix``)."""
    example = "e.g. projects/configs/lite_medsam/gt-box_lite-medsam.py"
    model = cfg.get("model")
    if not isinstance(model, dict) or "type" not in model:
        got = f"'model' is {model!r}" if "model" in cfg else f"it has {sorted(cfg.keys()) or 'nothing'}"
        raise InputError(f"{where}: an mmdet config of this toolkit needs 'model' with 'type' ({example}); {got}")
    test = cfg.get("data", {}).get("test") if isinstance(cfg.get("data"), dict) else None
    if not isinstance(test, dict) or not {"ann_file", "img_prefix"} <= set(test):
        raise InputError(f"{where}: an mmdet config of this toolkit needs 'data.test' with 'ann_file' and "
                         f"'img_prefix' ({example}); 'data.test' is {test!r}")


def check_cfg_options(cfg, options: dict, path: str) -> None:
    """Every ``--cfg-options`` key must name an existing config key (mmcv would silently add a misspelt one), except
    a new argument inside a dict with a ``type`` (the keyword arguments of what it builds) that is not a near-miss of
    a key already there (``ann_fil`` for ``ann_file``)."""
    import difflib  # noqa: PLC0415

    for key in options:
        node, parts = cfg._cfg_dict, key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if isinstance(node, dict) and part in node:
                node = node[part]
                continue
            near = difflib.get_close_matches(part, list(node) if isinstance(node, dict) else [], n=3)
            if last and isinstance(node, dict) and "type" in node and not difflib.get_close_matches(
                    part, list(node), n=1, cutoff=0.8):
                break  # a new keyword argument of a built object (a wrong one fails when it is built)
            where = ".".join(parts[:depth]) or "the top level"
            raise UnknownName(f"--cfg-options {key}: {path} has no key '{part}' under {where}"
                              + (f" (did you mean {', '.join(near)}?)" if near else
                                 f" (keys there: {sorted(node)[:12]})" if isinstance(node, dict) else ""))


@torch.no_grad()
def run_inference(model, dataset, device, indices, show_dir=None, show_score_thr=0.3, desc="eval", show=False):
    """Results per dataset index, and the images skipped because they cannot be read ({index, file, reason})."""
    import mmcv  # noqa: PLC0415
    from mmdet.core import encode_mask_results  # noqa: PLC0415

    results, skipped = {}, []
    for idx in progress(indices, desc=desc):
        try:
            img, metas = collate_one(dataset, idx, device)
            bbox_res, segm_res = model.simple_test(img, metas, rescale=True)[0]
        except ImageReadError as e:
            print(f"warning: skipping image {e.path}: {e.reason} (counted in metrics.json 'skipped_images')",
                  file=sys.stderr)
            skipped.append({"index": idx, "file": e.path, "reason": e.reason})
            continue
        if show_dir or show:
            out_file = os.path.join(show_dir, Path(metas[0]["ori_filename"]).stem + ".png") if show_dir else None
            image = mmcv.imread(metas[0]["filename"])
            if out_file:  # written whole or not at all
                atomic_write(out_file, lambda tmp, _im=image, _r=(bbox_res, segm_res): model.show_result(
                    _im, _r, score_thr=show_score_thr, show=False, out_file=tmp))
            if show:
                model.show_result(image, (bbox_res, segm_res), score_thr=show_score_thr, show=True)
        results[idx] = (bbox_res, encode_mask_results(segm_res))
    return results, skipped


def gather(obj, world: int) -> list:
    """Every rank's ``obj`` (a list of one item on a single process)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist  # noqa: PLC0415

    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def gather_results(results: dict, skipped: list, world: int):
    """All ranks' results (dict index -> result, merged) and skipped images (sorted by index)."""
    merged = {}
    for part in gather(results, world):
        merged.update(part)
    return merged, sorted((s for part in gather(skipped, world) for s in part), key=lambda s: s["index"])


def evaluate(dataset, results, metrics):
    import io  # noqa: PLC0415
    from contextlib import redirect_stdout  # noqa: PLC0415

    buf = io.StringIO()
    with redirect_stdout(buf):
        ev = dataset.evaluate(results, metric=metrics)
    return {k: float(v) for k, v in ev.items() if isinstance(v, (int, float))}, buf.getvalue()


def fp_cache_path(model, dataset, cfg, eval_metrics, n: int, device, world: int) -> Path:
    """Where the FP baseline of this exact evaluation is kept: a hash of the model's float weights (SAM and prompt
    detector), the resolved config, the annotation file and the evaluated images' names / sizes / times, the toolkit's
    source (ptq4sam/, projects/), the torch / mmdet versions, the device type, the image count and the metrics; in
    ``$PTQ4SAM_CACHE_DIR/fp_eval`` when that is set, else ``work_dirs/.fp_cache``."""
    import hashlib  # noqa: PLC0415

    import mmdet  # noqa: PLC0415

    h = hashlib.sha256()
    h.update(json.dumps([cfg.pretty_text, n, list(eval_metrics), torch.__version__, mmdet.__version__, device.type,
                         world]).encode())
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(Path(cfg.data.test.ann_file).read_bytes())
    prefix = Path(cfg.data.test.img_prefix)
    for info in dataset.data_infos[:n]:  # the images evaluated, in the evaluation's order
        st = (prefix / info["filename"]).stat()
        h.update(f"{info['filename']}:{st.st_size}:{st.st_mtime_ns}".encode())
    for root in ("ptq4sam", "projects"):
        for f in sorted((REPO_ROOT / root).rglob("*.py")):
            h.update(str(f.relative_to(REPO_ROOT)).encode() + f.read_bytes())
    root = Path(os.environ["PTQ4SAM_CACHE_DIR"]) / "fp_eval" if os.environ.get("PTQ4SAM_CACHE_DIR") \
        else REPO_ROOT / "work_dirs" / ".fp_cache"
    return root / f"{h.hexdigest()[:20]}.json"


def print_table(rows: dict, keys=("segm_mAP", "segm_mAP_50", "segm_mAP_75", "bbox_mAP"), fp=None):
    """One line per model; with an FP row, each model's mask mAP as a share of FP's too."""
    head = f"{'model':<28}" + "".join(f"{k:>13}" for k in keys) + (f"{'% of FP':>10}" if fp else "")
    print(head)
    print("-" * len(head))
    for name, m in rows.items():
        pct = (f"{100 * m.get('segm_mAP', float('nan')) / fp['segm_mAP']:>10.1f}" if fp and fp.get("segm_mAP")
               else (f"{'':>10}" if fp else ""))
        print(f"{name:<28}" + "".join(f"{m.get(k, float('nan')):>13.4f}" for k in keys) + pct)


def main(argv=None):
    """The CLI: known input errors are one line on stderr and exit status 2 (``--debug``: with the traceback)."""
    return run_cli(run, parse_args(argv))


def check_args(args):
    """CLI-level checks before any work: (the mmdet config, the q_config or None, the writable work dir)."""
    cfg = load_config(args.config, args.cfg_options)
    qcfg = None
    if args.q_config and not args.fp:
        from ptq4sam.qconfig import load_qconfig  # noqa: PLC0415

        qcfg = load_qconfig(args.q_config, args.q_options)
        if args.seed is not None:  # one seed for the whole run: calibration order, QDrop masks, reconstruction
            qcfg.seed = args.seed
    if args.backend != "torch":
        if not args.onnx:
            raise InputError(f"--backend {args.backend} runs exported graphs: give --onnx DIR (tools/export_onnx.py)")
        if qcfg is not None or args.load_sam_path or args.fp_baseline:
            raise InputError(f"--backend {args.backend}: the exported graphs carry their own quantization; drop "
                             "--q_config / --load_sam_path / --fp-baseline (evaluate the FP export as another run)")
    elif args.onnx:
        raise InputError("--onnx is read by --backend ort|openvino only")
    if args.resume and qcfg is None:
        raise InputError("--resume continues a quantization: give --q_config (not --fp)")
    if args.load_sam_path and Path(args.load_sam_path).is_dir():
        raise InputError(f"--load_sam_path {args.load_sam_path}: is a folder; give the file --save_sam_path wrote")
    if args.load_sam_path and not Path(args.load_sam_path).is_file():
        raise InputNotFound(f"--load_sam_path: {args.load_sam_path} not found")
    if args.resume and args.load_sam_path:
        raise InputError("--resume and --load_sam_path exclude each other (a loaded model is not reconstructed)")
    # outputs are checked before any work: a folder that cannot be written fails now, not after hours
    work_dir = check_writable_dir(args.work_dir or REPO_ROOT / "work_dirs" / Path(args.config).stem, "--work-dir")
    if args.show_dir:
        check_writable_dir(args.show_dir, "--show-dir")
    for flag, out in (("--save_sam_path", args.save_sam_path), ("--out", args.out)):
        if out:
            if Path(out).is_dir():
                raise WorkDirError(f"{flag} {out}: is a folder; give a file path")
            check_writable_dir(Path(out).parent, f"{flag} folder")
    return cfg, qcfg, work_dir


def build_model(cfg, device, backend: str, onnx_dir, threads: int):
    """The evaluation dataset and the detector + SAM model (or SAM as exported graphs on an ONNX backend)."""
    from mmdet.models import build_detector  # noqa: PLC0415

    dataset = build_eval_dataset(cfg.data.test, "data.test")
    if len(dataset) == 0:
        raise InputError(f"data.test: {cfg.data.test.ann_file} lists no images: nothing to evaluate")
    try:
        model = build_detector(cfg.model)
    except TypeError as e:  # mmcv's build_from_cfg: a config argument the class does not take, or lacks
        if "argument" not in str(e):
            raise
        raise InputError(f"{cfg.filename}: model: {e}") from None
    model.CLASSES = dataset.CLASSES
    model.to(device).eval()
    if backend != "torch":
        from ptq4sam.deploy.runtime import OnnxSegmenter  # noqa: PLC0415

        model.segmenter = OnnxSegmenter(model.segmenter, onnx_dir, backend, threads)
    return dataset, model


class Evaluator:
    """Runs the model on this rank's images, gathers the results and scores them with COCO's metrics."""

    def __init__(self, model, dataset, device, n: int, rank: int, world: int, timer: PhaseTimer, metrics: dict,
                 eval_metrics, show_dir=None, show_score_thr=0.3, show=False):
        self.model, self.dataset, self.device, self.n, self.rank, self.world = model, dataset, device, n, rank, world
        self.indices = list(range(rank, n, world))
        self.timer, self.metrics, self.eval_metrics = timer, metrics, eval_metrics
        self.show_dir, self.show_score_thr, self.show = show_dir, show_score_thr, show

    def __call__(self, name: str):
        with self.timer.phase(f"eval_{name}"):
            res, skipped = run_inference(self.model, self.dataset, self.device, self.indices,
                                         self.show_dir if name != "fp_baseline" else None, self.show_score_thr,
                                         desc=name, show=self.show)
            res, skipped = gather_results(res, skipped, self.world)
        self.metrics[f"images_per_s_{name}"] = round(len(self.indices) / max(self.timer.times[f"eval_{name}"], 1e-9), 3)
        if self.rank != 0:
            return None, None
        keep = [i for i in range(self.n) if i in res]
        if not keep:
            raise InputError(f"data.test: none of the {self.n} images could be read ({skipped[0]['file']}: "
                             f"{skipped[0]['reason']}, ...)")
        self.metrics["skipped_images" if name != "fp_baseline" else "skipped_images_fp_baseline"] = skipped
        subset = self.dataset if len(keep) == len(self.dataset) else _subset_dataset(self.dataset, keep)
        ev, _ = evaluate(subset, [res[i] for i in keep], self.eval_metrics)
        if skipped:
            print(f"warning: {len(skipped)} of {self.n} images could not be read and are left out of the evaluation "
                  f"(metrics.json 'skipped_images'): {', '.join(s['file'] for s in skipped[:5])}", file=sys.stderr)
        return ev, [res[i] for i in keep]


def fp_baseline(evaluator: Evaluator, cfg, use_cache: bool) -> dict:
    """The float model's metrics on the same images: from the FP cache when this exact evaluation ran before."""
    e = evaluator
    cache = fp_cache_path(e.model, e.dataset, cfg, e.eval_metrics, e.n, e.device, e.world) if use_cache else None
    if cache is not None and cache.is_file():  # the same float model, data and code: evaluated before
        print(f"FP baseline from {cache} (same model weights, config, data and code; --no-fp-cache to redo)")
        e.metrics["fp_cached"] = str(cache)
        return json.loads(cache.read_text())["fp"]
    ev, _ = e("fp_baseline")
    if e.rank == 0 and cache is not None:
        atomic_write_text(cache, json.dumps({"fp": ev, "config": cfg.filename, "num_images": e.n}, indent=1))
    return ev


def run(args):
    cfg, qcfg, work_dir = check_args(args)
    rank, world = init_dist(args.launcher)
    device = pick_device(args.gpu_id, args.launcher)
    seed = qcfg.seed if qcfg is not None else (args.seed if args.seed is not None else 0)
    set_seed(seed)
    timer = PhaseTimer()
    with timer.phase("setup"):
        dataset, model = build_model(cfg, device, args.backend, args.onnx, args.threads)
    n = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    metrics = {"config": args.config, "q_config": args.q_config, "seed": seed, "num_images": n,
               "world_size": world, "device": str(device), "model_type": model.model_type,
               "prompt": cfg.model.prompt.get("type"), "split": cfg.data.test.ann_file, "backend": args.backend,
               "annotation_warnings": getattr(dataset, "annotation_warnings", [])}
    if args.backend != "torch":
        man = model.segmenter.manifest
        metrics.update({"onnx": args.onnx, "threads": args.threads, "quantized_export": man["quantized"],
                        "export_q_config": man["q_config"], "export_quant_encoder": man["quant_encoder"],
                        "export_file_bytes": man["file_bytes"], "export_emulated": man["emulated"]})
    evaluator = Evaluator(model, dataset, device, n, rank, world, timer, metrics, args.eval, args.show_dir,
                          args.show_score_thr, args.show)
    rows = {}
    job = None
    if qcfg is not None:
        from ptq4sam.mixed import bits_label  # noqa: PLC0415
        from ptq4sam.solver.quant_job import QuantJob, quantize_model  # noqa: PLC0415

        if args.fp_baseline:
            ev = fp_baseline(evaluator, cfg, use_cache=not args.no_fp_cache)
            if rank == 0:
                rows["FP"] = metrics["fp"] = ev
        job = QuantJob(config=args.config, work_dir=work_dir, quant_encoder=args.quant_encoder,
                       load_sam_path=args.load_sam_path, save_sam_path=args.save_sam_path, resume=args.resume,
                       paper_eval_bugs=args.paper_eval_bugs)
        t = time.time()
        qinfo = quantize_model(model, cfg, qcfg, job, device, rank, world)
        metrics.update(qinfo)
        # recon_state_saves is part of reconstruction (shown apart in metrics.json): not a phase of its own here
        phases = {k: v for k, v in qinfo.get("ptq_phases_s", {}).items() if k != "recon_state_saves"}
        if "prompt_calibration_s" in qinfo:
            timer.add("calibration_prompts", qinfo["prompt_calibration_s"])
        for k, v in phases.items():
            timer.add(k, v)
        timer.add("ptq_other", max(0.0, time.time() - t - sum(phases.values()) - qinfo.get("prompt_calibration_s", 0)))
        if args.compile_agq:
            from ptq4sam.quantization import use_compiled_agq  # noqa: PLC0415

            use_compiled_agq(True)
        metrics["compile_agq"] = args.compile_agq
        avg = metrics.get("avg_bits")
        name = bits_label(qcfg.w_qconfig.bit, qcfg.a_qconfig.bit, (avg["w"], avg["a"]) if avg else None,
                          mixed=bool(qcfg.overrides)) + label_note(vars(qcfg.inputs))
    elif args.backend != "torch":
        eq = model.segmenter.manifest["q_config"]
        name = (f"W{eq['w_qconfig']['bit']}A{eq['a_qconfig']['bit']}{label_note(eq.get('inputs') or {})}" if eq
                else "FP") + f" ({args.backend})"
    else:
        name = "FP"
    ev, res = evaluator(args.backend if args.backend != "torch" else "fp" if qcfg is None else "quant")
    metrics["timings"] = {f"{k}_s": v for k, v in timer.times.items()}
    if rank == 0:
        metrics.update(ev)
        rows[name] = ev
        metrics["quantized"] = qcfg is not None or bool(metrics.get("quantized_export"))
        if args.out:
            import mmcv  # noqa: PLC0415

            atomic_write(args.out, lambda tmp: mmcv.dump(res, tmp, file_format="pkl"))
        atomic_write_text(work_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        if job is not None and not job.load_sam_path:  # the run is complete: its resume state is not needed
            job.recon_state_path.unlink(missing_ok=True)
        print(f"config={args.config} q_config={args.q_config} seed={seed} images={n} split={cfg.data.test.ann_file}")
        print_table(rows, fp=rows.get("FP"))
        print(timer.summary())
        print(f"wrote {work_dir / 'metrics.json'}" + (f"; images with masks, boxes and scores in {args.show_dir}"
                                                        if args.show_dir else "")
              + (f"; quantized model in {metrics['saved_to']}" if "saved_to" in metrics else ""))
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _subset_dataset(dataset, keep):
    """A shallow copy of an mmdet CocoDataset restricted to the images at the indices ``keep`` (--max-images,
    unreadable images left out)."""
    import copy  # noqa: PLC0415

    sub = copy.copy(dataset)
    sub.data_infos = [dataset.data_infos[i] for i in keep]
    sub.img_ids = [dataset.img_ids[i] for i in keep]
    return sub
