"""The named methods of the comparison grid: each a q_config yaml (per bit width) plus option overrides, with the
paper it reproduces. ``tools/reproduce.py`` and ``tools/benchmark_accuracy.py`` run them by name.

``{b}`` in a yaml path is the bit width (``exp/demo/config{b}{b}.yaml`` -> ``exp/demo/config44.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    yaml: str  # q_config path relative to the repo root; "{b}" = bit width
    options: Tuple[str, ...] = ()
    paper: str = ""
    bits: Tuple[int, ...] = (8, 6, 5, 4)  # the widths it is defined at

    def q_config(self, bits: int) -> Path:
        if bits not in self.bits:
            raise InputError(f"method {self.name!r} is not defined at {bits} bits (only at {list(self.bits)})")
        return ROOT / self.yaml.format(b=bits)


_DEMO = "exp/demo/config{b}{b}.yaml"
_NO_PTQ4SAM = ("ptq4sam.BIG=false", "ptq4sam.AGQ=false")
_MINMAX_RTN = ("w_qconfig.quantizer=FixedFakeQuantize", "w_qconfig.observer=MinMaxObserver",
               "a_qconfig.quantizer=FixedFakeQuantize", "a_qconfig.observer=MinMaxObserver", "recon.iters=0") + _NO_PTQ4SAM

_LNQ_IMAGES = "ahcqsam.lnq_images=2"  # the demo budget's AGQ search images (agq_images: 2), for LNQ's search

_LIST: List[Method] = [
    Method("minmax_rtn", "MinMax RTN (no reconstruction)", _DEMO, _MINMAX_RTN, "round-to-nearest baseline"),
    Method("qdrop", "QDrop", _DEMO, _NO_PTQ4SAM, "Wei et al., ICLR 2022"),
    Method("ptq4sam", "PTQ4SAM (paper-exact: QDrop + BIG + AGQ)", _DEMO, (), "Lv et al., CVPR 2024"),
    Method("ahcptq", "AHCPTQ (PTQ4SAM + HLUQ + CAG)", _DEMO, ("ahcptq.HLUQ=true", "ahcptq.CAG=true"),
           "Zhang et al., ICCV 2025"),
    Method("saq_sam_star", "SAQ-SAM* (PTQ4SAM calibration + PCC, no reconstruction)", _DEMO,
           ("saqsam.PCC=true", "recon.iters=0"), "Zhu et al., SAQ-SAM (its PCC-only row)"),
    Method("saq_sam", "SAQ-SAM (PTQ4SAM + PCC + PAR)", _DEMO, ("saqsam.PCC=true", "saqsam.PAR=true"),
           "Zhu et al., SAQ-SAM"),
    Method("ahcq_sam", "AHCQ-SAM (AHCPTQ + ACNR, LNQ for AGQ)", _DEMO,
           ("ahcptq.HLUQ=true", "ahcptq.CAG=true", "ahcqsam.ACNR=true", "ahcqsam.LNQ=true", "ptq4sam.AGQ=false",
            _LNQ_IMAGES), "Zhang et al., AHCQ-SAM"),
    Method("ahcq_sam_lnq", "AHCQ-SAM without ACNR (AHCPTQ, LNQ for AGQ)", _DEMO,
           ("ahcptq.HLUQ=true", "ahcptq.CAG=true", "ahcqsam.LNQ=true", "ptq4sam.AGQ=false", _LNQ_IMAGES),
           "Zhang et al., AHCQ-SAM (its ablation without ACNR)"),
    Method("recommended", "Recommended recipe (chosen on dev)", "exp/recipes/w{b}a{b}-cpu.yaml", (),
           "this toolkit", bits=(8, 6, 5, 4)),
    Method("mixed", "Mixed precision recipe (not re-chosen on dev)", "exp/recipes/mixed-w4-cpu.yaml", (), "this toolkit",
           bits=(4,)),
    # single switches on QDrop / PTQ4SAM (ablations; the dev-split recipe search)
    Method("qdrop+big", "QDrop + BIG", _DEMO, ("ptq4sam.AGQ=false",)),
    Method("qdrop+agq", "QDrop + AGQ", _DEMO, ("ptq4sam.BIG=false",)),
    Method("ptq4sam_calib", "PTQ4SAM, calibration only (BIG + AGQ, no reconstruction)", _DEMO, ("recon.iters=0",)),
    Method("ptq4sam+hluq", "PTQ4SAM + HLUQ", _DEMO, ("ahcptq.HLUQ=true",)),
    Method("ptq4sam+cag", "PTQ4SAM + CAG", _DEMO, ("ahcptq.CAG=true",)),
    Method("ptq4sam+smooth", "PTQ4SAM + smoothing", _DEMO, ("smooth.enabled=true",)),
    Method("ptq4sam+logscale", "PTQ4SAM + log-space LSQ scales", _DEMO, ("recon.scale_lr=0.001", "recon.scale_space=log")),
    Method("qdrop+hluq", "QDrop + HLUQ", _DEMO, _NO_PTQ4SAM + ("ahcptq.HLUQ=true",)),
    Method("qdrop+cag", "QDrop + CAG", _DEMO, _NO_PTQ4SAM + ("ahcptq.CAG=true",)),
    Method("qdrop+smooth", "QDrop + smoothing", _DEMO, _NO_PTQ4SAM + ("smooth.enabled=true",)),
    Method("qdrop+gptq", "QDrop + GPTQ weights", _DEMO, _NO_PTQ4SAM + ("gptq.enabled=true",)),
    Method("ptq4sam+gptq", "PTQ4SAM + GPTQ weights", _DEMO, ("gptq.enabled=true",)),
    Method("ptq4sam+pcc", "PTQ4SAM + PCC (SAQ-SAM's clipping, PTQ4SAM's reconstruction)", _DEMO, ("saqsam.PCC=true",)),
    Method("ptq4sam+par", "PTQ4SAM + PAR (SAQ-SAM's prompt-aware reconstruction)", _DEMO, ("saqsam.PAR=true",)),
    Method("qdrop+nncf_attention", "QDrop, NNCF's attention placement (q / k symmetric, softmax.v float)", _DEMO,
           _NO_PTQ4SAM + ("attention.placement=nncf",)),
    Method("qdrop+float_attention", "QDrop, attention matmuls float (q, k, v, softmax)", _DEMO,
           _NO_PTQ4SAM + ("attention.placement=float",)),
    Method("ptq4sam+lnq", "PTQ4SAM with LNQ for AGQ", _DEMO, ("ahcqsam.LNQ=true", "ptq4sam.AGQ=false", _LNQ_IMAGES)),
    Method("ptq4sam+acnr", "PTQ4SAM + ACNR (AHCQ-SAM's weight conditioning)", _DEMO, ("ahcqsam.ACNR=true",)),
    Method("ptq4sam_calib+acnr", "PTQ4SAM calibration only + ACNR", _DEMO, ("recon.iters=0", "ahcqsam.ACNR=true")),
    Method("ptq4sam_calib+lnq", "PTQ4SAM calibration only, LNQ for AGQ", _DEMO,
           ("recon.iters=0", "ahcqsam.LNQ=true", "ptq4sam.AGQ=false", _LNQ_IMAGES)),
]
METHODS: Dict[str, Method] = {m.name: m for m in _LIST}


def method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def custom(name: str, spec: str) -> Method:
    """A method from ``YAML[,option,option...]`` (``--variant NAME=SPEC``): e.g.
    ``exp/demo/config{b}{b}.yaml,gptq.enabled=true,recon.iters=0``."""
    parts = [p for p in spec.split(",") if p]
    if not parts or "=" in parts[0]:
        raise InputError(f"--variant {name}={spec}: expected YAML[,key=value...], e.g. exp/demo/config{{b}}{{b}}.yaml,"
                         "gptq.enabled=true")
    return Method(name, name, parts[0], tuple(parts[1:]), "variant")


def resolve(names: List[str], variants: Optional[Dict[str, str]] = None) -> List[Method]:
    variants = variants or {}
    out = []
    for n in names:
        out.append(custom(n, variants[n]) if n in variants else method(n))
    return out
