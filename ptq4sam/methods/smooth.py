"""Exact activation smoothing (SmoothQuant-style; the algorithm in :mod:`ptq4sam.smooth`), yaml section ``smooth``:
per-channel factors folded into LayerNorm -> linear and v -> output projection pairs of the float model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from .. import smooth as smooth_mod
from ..progress import progress
from .base import Method


@dataclass
class SmoothSection:
    enabled: bool = False
    alpha: float = 0.5  # migration strength: s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)
    folds: List[str] = field(default_factory=lambda: ["norm", "v_out"])  # LayerNorm -> linear; v -> output proj.

    def check(self, bad, q) -> None:
        if not 0 <= self.alpha <= 1:
            bad("smooth.alpha", f"must be in [0, 1], got {self.alpha}")
        unknown = sorted(set(self.folds) - {"norm", "v_out"})
        if unknown:
            bad("smooth.folds", f"unknown {unknown}, expected some of ['norm', 'v_out']")


class Smoothing(Method):
    name, section, section_cls = "smooth", "smooth", SmoothSection

    def enabled(self, sec, qcfg) -> bool:
        return sec.enabled

    def before_convert(self, sec, job):
        from ..samples import forward_sample  # noqa: PLC0415

        job.seg.sam.to(job.device)

        def run():
            with torch.no_grad():
                for s in progress(job.samples, desc="smoothing: statistics"):
                    forward_sample(job.seg, s)
        n_sites, report = smooth_mod.smooth_sam(job.seg.sam, job.quant_encoder, run, sec.alpha, tuple(sec.folds))
        job.log(f"smoothing: {len(report)} of {n_sites} sites folded (alpha={sec.alpha})")
        return report
