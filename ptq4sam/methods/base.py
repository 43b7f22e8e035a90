"""What a quantization method is to the pipeline: a yaml section it reads, the quantizer it puts at the sites it
claims, and the steps it adds to calibration. The pipeline (``ptq4sam.ptq``) and the SAM adapter
(``ptq4sam.quant_sam``) consult the registry (``ptq4sam.methods.METHODS``) and know no method by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..quantization import QuantizerConfig

# quantization sites a method may claim (``site_quantizer``):
#   "linear_input" (kw: ch_axis)      the input of a Linear (or of a dense conv treated like one, ch_axis=1)
#   "conv_input"   (kw: conv, depthwise)  the input of a Conv2d
#   "softmax"                          an attention's softmax output
#   "attn_key"     (kw: decoder)       an attention's key before q.k^T
SITES = ("linear_input", "conv_input", "softmax", "attn_key")


@dataclass
class CalibrationJob:
    """The calibration's working state, handed to each method's steps."""

    seg: Any  # BoxPromptSegmenter
    samples: List[Any]  # CalibSample
    boxed: List[Any]  # the samples with boxes (decoder calibration)
    qcfg: Any  # QConfig
    quant_encoder: bool
    device: Any
    log: Callable[[str], None]
    info: Any  # ptq4sam.ptq.QuantInfo (method reports go to info.methods)
    box_feats: List[Any] = field(default_factory=list)  # image embeddings of ``boxed`` (decoder-only forwards)
    float_embeddings: Optional[Dict[int, Any]] = None  # the same by sample index, kept when the encoder is float


class Method:
    """One quantization method. Subclasses set ``name`` (its report key in metrics.json and its phase name),
    ``section`` (the yaml section it reads) and ``section_cls``, and override what they need."""

    name: str = ""
    section: str = ""
    section_cls: type = object
    structural: Tuple[str, ...] = ()  # q_config keys that change which quantizers exist (a checkpoint must match)

    def enabled(self, sec, qcfg) -> bool:
        return False

    def site_quantizer(self, sec, site: str, ctx, base: QuantizerConfig, **kw) -> Optional[QuantizerConfig]:
        """The quantizer this method puts at ``site`` of the module ``ctx`` describes (None: not this method's)."""
        return None

    def before_convert(self, sec, job: CalibrationJob) -> Optional[Any]:
        """On the float model, before quantizers exist (e.g. an exact re-parametrisation); returns the report."""

    def after_encoder(self, sec, job: CalibrationJob) -> Optional[Any]:
        """After the encoder's activation calibration, before the weights are observed (``job.box_feats`` set)."""

    def after_calibration(self, sec, job: CalibrationJob) -> Optional[Any]:
        """After every quantizer is calibrated, before reconstruction."""


def check_choice(bad, key: str, value, allowed) -> None:
    if value not in allowed:
        bad(key, f"must be one of {list(allowed)}, got {value!r}")
