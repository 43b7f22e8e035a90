"""GPTQ weights (Frantar et al., ICLR 2023; the algorithm in :mod:`ptq4sam.gptq`), yaml section ``gptq``: after
calibration every supported weight is quantized column by column with second-order error compensation; the float
weights stay (the quantizer rounds GPTQ's weight)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import gptq as gptq_alg
from ..progress import progress
from ..quantization import disable_all, enable_quantization
from .base import Method, check_choice, kept_embeddings, layer_input_samples


@dataclass
class GPTQSection:
    enabled: bool = False  # GPTQ weights after calibration; AdaRound, if it learns, starts there
    damp: float = gptq_alg.DEFAULT_DAMP  # Hessian dampening, a fraction of its mean diagonal
    act_order: bool = True  # columns by decreasing Hessian diagonal
    inputs: str = "quantized"  # Hessians of the layer inputs with the activation quantizers on, or 'float'

    def check(self, bad, q) -> None:
        check_choice(bad, "gptq.inputs", self.inputs, ("float", "quantized"))
        if not 0 < self.damp < 1:
            bad("gptq.damp", f"must be in (0, 1), got {self.damp}")


class GPTQ(Method):
    name, section, section_cls = "gptq", "gptq", GPTQSection

    def enabled(self, sec, qcfg) -> bool:
        return sec.enabled

    def after_calibration(self, sec, job):
        from ..samples import forward_sample  # noqa: PLC0415

        sam = job.seg.sam

        def run():  # on the calibration images (decoder where boxes; a float encoder's kept output), every weight float
            if sec.inputs == "quantized":  # activation quantizers on (the Hessians of quantized inputs)
                enable_quantization(sam, weights=False)
            use = layer_input_samples(job)  # a float encoder has no Hessians to collect
            for s, f in zip(progress(use, desc="GPTQ: input Hessians"), kept_embeddings(job, use)):
                forward_sample(job.seg, s, f)
            disable_all(sam)
        g = gptq_alg.apply_gptq(sam, run, sec.damp, sec.act_order, progress=progress)
        job.log(f"GPTQ: {g['layers']} layers in {g['time_s']} s, median proxy loss GPTQ / round-to-nearest "
                f"{g['proxy_ratio_median']}; not supported (round-to-nearest): {g['not_supported'] or 'none'}")
        return g
