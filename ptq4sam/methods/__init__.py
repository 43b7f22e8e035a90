"""The registry of quantization methods: the pipeline runs, and the SAM adapter consults, the methods listed here in
this order (the first method claiming a quantization site gives its quantizer). A new method is a file of this
package (its yaml section, its site quantizers and steps: :class:`base.Method`) plus one line below."""
from __future__ import annotations

from typing import Dict, List, Tuple

from .ahcptq import CAG, HLUQ
from .ahcq import ACNR, LNQ
from .attention import AttentionPlacement
from .base import CalibrationJob, Method  # noqa: F401
from .gptq import GPTQ
from .layer_inputs import LayerInputs
from .ptq4sam import AGQ, BIG
from .saq import PAR, PCC
from .smooth import Smoothing

METHODS: List[Method] = [
    AttentionPlacement(),  # first: the attention sites it leaves float or makes symmetric are its alone
    LayerInputs(),  # the same for the Linear / Conv2d inputs it leaves float
    Smoothing(),
    BIG(),
    HLUQ(),
    CAG(),
    ACNR(),  # before the weights are observed
    PCC(),  # after calibration, before GPTQ's Hessians of quantized inputs
    GPTQ(),
    LNQ(),  # before AGQ: AHCQ-SAM's softmax quantizer replaces PTQ4SAM's
    AGQ(),
    PAR(),  # the reconstruction's units and loss
]

SECTIONS: Dict[str, type] = {}  # yaml section -> its dataclass
for _m in METHODS:
    if SECTIONS.setdefault(_m.section, _m.section_cls) is not _m.section_cls:
        raise TypeError(f"methods {_m.name}: section {_m.section!r} is declared by two different classes")
STRUCTURAL: Tuple[str, ...] = tuple(k for m in METHODS for k in m.structural)


def active(qcfg) -> List[Tuple[Method, object]]:
    """(method, its yaml section) of every enabled method, in registry order."""
    return [(m, getattr(qcfg, m.section)) for m in METHODS if m.enabled(getattr(qcfg, m.section), qcfg)]
