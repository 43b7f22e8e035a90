"""mmdet side of quantization: calibration images + their prompts from the config, then the torch-only PTQ."""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ptq4sam.checkpoint import ReconCheckpoint, load_quantized, save_quantized
from ptq4sam.errors import ImageReadError, InputError, UnknownName
from ptq4sam.mixed import mac_weighted_bits
from ptq4sam.ptq import quantize_segmenter
from ptq4sam.quant_sam import quantize_sam
from ptq4sam.samples import CalibSample

from .data import build_eval_dataset, collate_one


def calibration_samples(model, cfg, qcfg, device, seed: int):
    if "calib" not in cfg.data:
        raise UnknownName("config has no data.calib (the calibration images); see projects/configs/_base_/")
    ds = build_eval_dataset(cfg.data.calib, "data.calib")
    ids = [info["id"] for info in ds.data_infos]
    if qcfg.calibrate > len(ds):
        raise InputError(f"calibrate: {qcfg.calibrate} images asked, {cfg.data.calib.ann_file} has {len(ds)}")
    if qcfg.calibrate_mode == "first":
        order = list(np.argsort(ids, kind="stable"))
    else:
        order = list(np.random.default_rng(seed).permutation(len(ds)))
    samples, names, skipped = [], [], []
    with torch.no_grad():
        for idx in order:
            if len(samples) == qcfg.calibrate:
                break
            try:
                img, metas = collate_one(ds, int(idx), device)
                image = model.load_image(metas[0])
            except ImageReadError as e:  # the next image by the same order takes its place
                print(f"warning: calibration: skipping image {e.path}: {e.reason}", file=sys.stderr)
                skipped.append({"file": e.path, "reason": e.reason})
                continue
            prompts = model.prompt_source(img, metas)[0]
            samples.append(CalibSample(image, prompts.boxes))
            names.append(metas[0]["ori_filename"])
    if len(samples) < qcfg.calibrate:
        raise InputError(f"calibrate: {qcfg.calibrate} images asked, only {len(samples)} of the {len(ds)} in "
                         f"{cfg.data.calib.ann_file} can be read ({len(skipped)} skipped, e.g. {skipped[0]['file']})")
    return samples, names, skipped


@dataclass(frozen=True)
class QuantJob:
    """What a quantization run needs from the command line, as plain values (the CLI layer builds it)."""
    config: str  # the mmdet config path (part of the resume fingerprint)
    work_dir: Path  # where recon_state.pt (crash-safe resume state) lives
    quant_encoder: bool = False
    load_sam_path: Optional[str] = None
    save_sam_path: Optional[str] = None
    resume: bool = False
    paper_eval_bugs: bool = False

    @property
    def recon_state_path(self) -> Path:
        return Path(self.work_dir) / "recon_state.pt"


def quantize_model(model, cfg, qcfg, job: QuantJob, device, rank: int, world: int) -> dict:
    seg = model.segmenter
    info = {"bits": {"w": qcfg.w_qconfig.bit, "a": qcfg.a_qconfig.bit},
            "quantized_parts": ["mask_decoder.transformer"] + (["image_encoder"] if job.quant_encoder else []),
            "float_modules": list(qcfg.float_modules), "q_config_resolved": qcfg.to_dict()}
    if job.load_sam_path:
        t = time.time()
        from ptq4sam.quant_sam import build_context  # noqa: PLC0415

        for p in seg.sam.parameters():
            p.requires_grad_(False)
        quantize_sam(seg.sam, build_context(qcfg), job.quant_encoder, float_modules=tuple(qcfg.float_modules))
        saved = load_quantized(seg.sam, job.load_sam_path, device, qcfg, job.quant_encoder)
        info.update(saved)
        info["loaded_from"] = job.load_sam_path
        info["load_s"] = round(time.time() - t, 2)
        return info
    torch.manual_seed(qcfg.seed)  # (--seed is in qcfg.seed): QDrop's masks inside units draw from it
    t = time.time()
    samples, names, skipped = calibration_samples(model, cfg, qcfg, device, qcfg.seed)
    info["calibration_images"] = names
    info["calibration_skipped_images"] = skipped
    info["calibration_boxes"] = int(sum(len(s.boxes) for s in samples))
    info["prompt_calibration_s"] = round(time.time() - t, 2)
    # every rank resumes from the same file; rank 0 writes it
    checkpoint = ReconCheckpoint(job.recon_state_path, fingerprint(job, qcfg, names, samples), resume=job.resume,
                                 write=rank == 0, log=print if rank == 0 else (lambda *a: 0))
    info.update(quantize_segmenter(seg, samples, qcfg, job.quant_encoder, device, paper_eval_bugs=job.paper_eval_bugs,
                                   log=print if rank == 0 else (lambda *a: 0), checkpoint=checkpoint).to_dict())
    if qcfg.overrides:  # mixed precision: the MAC-weighted average bits name the run (never "W4A4")
        info["avg_bits"] = dict(zip(("w", "a"), mac_weighted_bits(seg, samples)))
    if job.save_sam_path and rank == 0:
        size = save_quantized(seg.sam, job.save_sam_path, qcfg.to_dict(), job.quant_encoder,
                              {k: v for k, v in info.items() if k != "calibration_images"})
        info["saved_to"] = job.save_sam_path
        info["saved_checkpoint"] = {"bytes": size.bytes, "fp_state_dict_bytes": size.fp_bytes,
                                    "ratio": round(size.ratio, 4), "int_layers": size.int_layers,
                                    "off_grid_layers_kept_float": size.float_layers}
        print(f"saved {job.save_sam_path}: {size.bytes / 2**20:.2f} MB, {size.int_layers} layers as "
              f"W{qcfg.w_qconfig.bit} integers ({size.ratio:.3f}x the FP state dict's {size.fp_bytes / 2**20:.2f} MB)")
    return info


def fingerprint(job: QuantJob, qcfg, names, samples) -> dict:
    """What must be equal for --resume to continue a run: q_config, flags, seed, calibration images and prompts."""
    boxes = hashlib.sha256()
    for s in samples:
        boxes.update(np.ascontiguousarray(np.asarray(s.boxes, np.float32)).tobytes())
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif k != "source":
                yield f"q_config.{prefix}{k}", v
    return {**dict(flat(qcfg.to_dict())), "quant_encoder": bool(job.quant_encoder),
            "seed": int(qcfg.seed), "paper_eval_bugs": bool(job.paper_eval_bugs),
            "config": str(job.config), "calibration_images": names, "calibration_boxes_sha256": boxes.hexdigest()[:16]}
