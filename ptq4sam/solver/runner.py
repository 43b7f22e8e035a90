"""The test_quant.py job: build config, data and model, (quantize), evaluate, write metrics.json."""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ptq4sam.progress import PhaseTimer, progress
from ptq4sam.solver.data import build_eval_dataset, collate_one

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    from mmcv import DictAction  # noqa: PLC0415

    p = argparse.ArgumentParser(description="PTQ4SAM: quantize and evaluate a box-prompted SAM on COCO")
    p.add_argument("--config", required=True, help="mmdet config (projects/configs/...)")
    p.add_argument("--q_config", "--q-config", dest="q_config", default=None, help="quantization yaml (exp/...)")
    p.add_argument("--quant-encoder", action="store_true", help="also quantize the SAM image encoder")
    p.add_argument("--fp", action="store_true", help="evaluate the full-precision model (no quantization)")
    p.add_argument("--fp-baseline", action="store_true", help="evaluate FP too and print it beside the quantized")
    p.add_argument("--no-fp-cache", action="store_true",
                   help="evaluate the FP baseline even if the same evaluation is cached in work_dirs/.fp_cache/")
    p.add_argument("--work-dir", default=None, help="where metrics.json goes (default work_dirs/<config name>)")
    p.add_argument("--eval", nargs="+", default=["bbox", "segm"], help="COCO metrics to evaluate")
    p.add_argument("--out", default=None, help="also dump the raw results to this .pkl")
    p.add_argument("--show", action="store_true", help="show results in a window (needs a display)")
    p.add_argument("--show-dir", default=None, help="write one PNG per image with masks, boxes, labels, scores")
    p.add_argument("--show-score-thr", type=float, default=0.3)
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. data.test.ann_file=... data.calib.img_prefix=...")
    p.add_argument("--q-options", nargs="+", default=[], help="override q_config keys, e.g. recon.iters=200")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="default: the q_config's seed, else 0")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images (debugging)")
    p.add_argument("--save_sam_path", "--save-sam-path", dest="save_sam_path", default=None)
    p.add_argument("--load_sam_path", "--load-sam-path", dest="load_sam_path", default=None)
    p.add_argument("--paper-eval-bugs", "--legacy-eval-drop", dest="paper_eval_bugs", action="store_true",
                   help="reproduce the paper code's two evaluation leaks (to compare with its numbers): layer-input "
                        "quantizers left at QDrop's drop probability 0.5 and only the first AdaRound layer of each "
                        "reconstruction unit hardened (the others keep soft rounding); recorded in metrics.json")
    p.add_argument("--compile-agq", action="store_true",
                   help="evaluate AGQ with a torch.compile-fused kernel on CUDA (faster; last-bit differences possible)")
    args = p.parse_args(argv)
    if not args.fp and not args.q_config:
        p.error("give --q_config for quantization, or --fp to evaluate the float model")
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

    if not Path(path).is_file():
        raise FileNotFoundError(f"config not found: {path}")
    cfg = Config.fromfile(path)
    if options:
        cfg.merge_from_dict(options)
    import projects.instance_segment_anything  # noqa: F401,PLC0415  (registers the plugin)

    prompt = cfg.model.get("prompt")
    if isinstance(prompt, dict) and prompt.get("type") in ("gt", "json") and not prompt.get("ann_file"):
        # GT / cached-detection prompts are looked up in the dataset's own annotation files
        prompt.ann_file = [cfg.data.test.ann_file] + ([cfg.data.calib.ann_file] if "calib" in cfg.data else [])
    return cfg


@torch.no_grad()
def run_inference(model, dataset, device, indices, show_dir=None, show_score_thr=0.3, desc="eval", show=False):
    import mmcv  # noqa: PLC0415
    from mmdet.core import encode_mask_results  # noqa: PLC0415

    results = {}
    for idx in progress(indices, desc=desc):
        img, metas = collate_one(dataset, idx, device)
        bbox_res, segm_res = model.simple_test(img, metas, rescale=True)[0]
        if show_dir or show:
            out_file = os.path.join(show_dir, Path(metas[0]["ori_filename"]).stem + ".png") if show_dir else None
            model.show_result(mmcv.imread(metas[0]["filename"]), (bbox_res, segm_res), score_thr=show_score_thr,
                              show=show, out_file=out_file)
        results[idx] = (bbox_res, encode_mask_results(segm_res))
    return results


def gather_results(results: dict, world: int):
    if world == 1:
        return [results[i] for i in sorted(results)]
    import torch.distributed as dist  # noqa: PLC0415

    parts = [None] * world
    dist.all_gather_object(parts, results)
    merged = {}
    for part in parts:
        merged.update(part)
    return [merged[i] for i in sorted(merged)]


def evaluate(dataset, results, metrics):
    import io  # noqa: PLC0415
    from contextlib import redirect_stdout  # noqa: PLC0415

    buf = io.StringIO()
    with redirect_stdout(buf):
        ev = dataset.evaluate(results, metric=metrics)
    return {k: float(v) for k, v in ev.items() if isinstance(v, (int, float))}, buf.getvalue()


def fp_cache_path(model, dataset, cfg, args, n: int, device, world: int) -> Path:
    """Where the FP baseline of this exact evaluation is kept: a hash of the model's float weights (SAM and prompt
    detector), the resolved config, the annotation file and the evaluated images' names / sizes / times, the toolkit's
    source (ptq4sam/, projects/), the torch / mmdet versions, the device type, the image count and the metrics."""
    import hashlib  # noqa: PLC0415

    import mmdet  # noqa: PLC0415

    h = hashlib.sha256()
    h.update(json.dumps([cfg.pretty_text, n, args.eval, torch.__version__, mmdet.__version__, device.type,
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
    return REPO_ROOT / "work_dirs" / ".fp_cache" / f"{h.hexdigest()[:20]}.json"


def print_table(rows: dict, keys=("segm_mAP", "segm_mAP_50", "segm_mAP_75", "bbox_mAP")):
    head = f"{'model':<28}" + "".join(f"{k:>13}" for k in keys)
    print(head)
    print("-" * len(head))
    for name, m in rows.items():
        print(f"{name:<28}" + "".join(f"{m.get(k, float('nan')):>13.4f}" for k in keys))


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    rank, world = init_dist(args.launcher)
    device = pick_device(args.gpu_id, args.launcher)
    qcfg = None
    if args.q_config and not args.fp:
        from ptq4sam.qconfig import load_qconfig  # noqa: PLC0415

        qcfg = load_qconfig(args.q_config, args.q_options)
    seed = args.seed if args.seed is not None else (qcfg.seed if qcfg is not None else 0)
    set_seed(seed)
    work_dir = Path(args.work_dir or REPO_ROOT / "work_dirs" / Path(args.config).stem)
    work_dir.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()

    from mmdet.models import build_detector  # noqa: PLC0415

    with timer.phase("setup"):
        dataset = build_eval_dataset(cfg.data.test, "data.test")
        model = build_detector(cfg.model)
        model.CLASSES = dataset.CLASSES
        model.to(device).eval()
    n = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    indices = list(range(rank, n, world))
    metrics = {"config": args.config, "q_config": args.q_config, "seed": seed, "num_images": n,
               "world_size": world, "device": str(device), "model_type": model.model_type,
               "prompt": cfg.model.prompt.get("type"), "split": cfg.data.test.ann_file}
    rows = {}

    def evaluate_model(name):
        with timer.phase(f"eval_{name}"):
            res = gather_results(run_inference(model, dataset, device, indices, args.show_dir if name != "fp_baseline"
                                               else None, args.show_score_thr, desc=name, show=args.show), world)
        metrics[f"images_per_s_{name}"] = round(len(indices) / max(timer.times[f"eval_{name}"], 1e-9), 3)
        if rank != 0:
            return None, None
        subset = dataset
        if n < len(dataset):
            subset = _subset_dataset(dataset, n)
        ev, log = evaluate(subset, res, args.eval)
        return ev, res

    if qcfg is not None:
        from ptq4sam.solver.quant_job import quantize_model  # noqa: PLC0415

        if args.fp_baseline:
            cache = None if args.no_fp_cache else fp_cache_path(model, dataset, cfg, args, n, device, world)
            if cache is not None and cache.is_file():  # the same float model, data and code: evaluated before
                ev = json.loads(cache.read_text())["fp"]
                print(f"FP baseline from {cache} (same model weights, config, data and code; --no-fp-cache to redo)")
                metrics["fp_cached"] = str(cache)
            else:
                ev, _ = evaluate_model("fp_baseline")
                if rank == 0 and cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"fp": ev, "config": args.config, "num_images": n}, indent=1))
                    tmp.replace(cache)
            if rank == 0:
                rows["FP"] = ev
                metrics["fp"] = ev
        t = time.time()
        qinfo = quantize_model(model, cfg, qcfg, args, device, rank, world)
        metrics.update(qinfo)
        phases = qinfo.get("ptq_phases_s", {})
        if "prompt_calibration_s" in qinfo:
            timer.add("calibration_prompts", qinfo["prompt_calibration_s"])
        for k, v in phases.items():
            timer.add(k, v)
        timer.add("ptq_other", max(0.0, time.time() - t - sum(phases.values()) - qinfo.get("prompt_calibration_s", 0)))
        if args.compile_agq:
            from ptq4sam.quantization import use_compiled_agq  # noqa: PLC0415

            use_compiled_agq(True)
        metrics["compile_agq"] = args.compile_agq
    name = "FP" if qcfg is None else f"W{qcfg.w_qconfig.bit}A{qcfg.a_qconfig.bit}"
    ev, res = evaluate_model("fp" if qcfg is None else "quant")
    metrics["timings"] = {f"{k}_s": v for k, v in timer.times.items()}
    if rank == 0:
        metrics.update(ev)
        rows[name] = ev
        metrics["quantized"] = qcfg is not None
        (work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if args.out:
            import mmcv  # noqa: PLC0415

            mmcv.dump(res, args.out)
        print(f"config={args.config} q_config={args.q_config} seed={seed} images={n} split={cfg.data.test.ann_file}")
        print_table(rows)
        print(timer.summary())
        print(f"wrote {work_dir / 'metrics.json'}")
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _subset_dataset(dataset, n: int):
    """A shallow copy of an mmdet CocoDataset restricted to its first n images (for --max-images)."""
    import copy  # noqa: PLC0415

    sub = copy.copy(dataset)
    sub.data_infos = dataset.data_infos[:n]
    sub.img_ids = dataset.img_ids[:n]
    return sub
