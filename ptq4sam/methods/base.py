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
#   "attn_query"                       an attention's query before q.k^T
#   "attn_key"     (kw: decoder)       an attention's key before q.k^T
#   "attn_value"                       an attention's value before attn.v
SITES = ("linear_input", "conv_input", "softmax", "attn_query", "attn_key", "attn_value")
FLOAT = QuantizerConfig(bit=None)  # a method's answer for a site it leaves float (no quantizer there)


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
        """The quantizer this method puts at ``site`` of the module ``ctx`` describes (None: not this method's;
        :data:`FLOAT`: the site stays float)."""
        return None

    def before_convert(self, sec, job: CalibrationJob) -> Optional[Any]:
        """On the float model, before quantizers exist (e.g. an exact re-parametrisation); returns the report."""

    def after_encoder(self, sec, job: CalibrationJob) -> Optional[Any]:
        """After the encoder's activation calibration, before the decoder's (``job.box_feats`` set)."""

    def before_weights(self, sec, job: CalibrationJob) -> Optional[Any]:
        """After every activation quantizer is calibrated, before the weights are observed (e.g. a weight to
        quantize instead of the float one: ``set_quant_source``)."""

    def after_calibration(self, sec, job: CalibrationJob) -> Optional[Any]:
        """After every quantizer is calibrated, before reconstruction."""

    def recon_stages(self, sec, sam, quant_encoder: bool, stages: List[Tuple[Any, List[Any]]]):
        """The reconstruction's [(stage, units)]: ``stages`` (the ``recon.units`` default), or this method's own."""
        return stages

    def recon_objective(self, sec, seg, samples: List[Any], seed: int) -> Optional[Any]:
        """A :class:`ptq4sam.reconstruction.UnitObjective` (this method's loss terms), or None (the paper's loss)."""
        return None


def check_choice(bad, key: str, value, allowed) -> None:
    if value not in allowed:
        bad(key, f"must be one of {list(allowed)}, got {value!r}")


def softmax_search(job: CalibrationJob, attentions: List[Any], samples: List[Any], make: Callable[[Any], Any],
                   desc: str) -> Dict[int, Dict]:
    """A per-image search of softmax quantizers (AGQ's, LNQ's): float forwards of ``samples``, one image at a time;
    each attention's (softmax output, v) goes to its searcher (``make(attention)``: ``add(attn, v)``, ``result()``)
    and is dropped. Returns each searcher's result by attention id."""
    from ..samples import record  # noqa: PLC0415

    searches = {id(a): make(a) for a in attentions}

    def each(cur):
        for aid, rec in cur.items():
            if "attn" in rec:
                searches[aid].add(rec["attn"], rec["v"])
    record(job.seg, samples, attentions, ["attn", "v"], desc=desc, each=each, feats=kept_embeddings(job, samples))
    return {aid: s.result() for aid, s in searches.items()}


def layer_input_samples(job: CalibrationJob) -> List[Any]:
    """The calibration samples whose forwards reach a quantized layer: all of them when the encoder is quantized;
    with a float encoder (its outputs kept: :func:`kept_embeddings`) only those with boxes (the decoder)."""
    return job.samples if job.float_embeddings is None else job.boxed


def kept_embeddings(job: CalibrationJob, samples: List[Any]) -> List[Any]:
    """The float image embeddings calibration kept for ``samples`` (a float encoder: its output is final), aligned
    with them; None where one was not kept (that image is encoded again)."""
    kept = job.float_embeddings or {}
    index = {id(s): i for i, s in enumerate(job.samples)}
    return [kept.get(index.get(id(s), -1)) for s in samples]
