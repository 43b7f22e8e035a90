"""Which layers' inputs are quantized, yaml section ``inputs``. ``linear: quantized`` and ``conv: quantized`` (the
defaults) quantize the input of every quantized Linear / Conv2d with ``a_qconfig``; ``float`` leaves that kind's inputs
float while its weights stay on the ``w_qconfig`` grid (weight-only layers, e.g. W8 Linear layers with float
activations beside W8A8 convolutions). The attention's own points (q, k, softmax output, v) are ``attention``'s.

Made for CPUs without int8 dot products (AVX2 without VNNI): there a quantized Linear runs no faster than a float one,
while its activation QDQ and its weight decompression cost time, and OpenVINO still runs W8A8 convolutions as integer
kernels (``docs/deploy.md``, "W8A8 for AVX2 CPUs"). With ``linear: float`` the quantizers that live on Linear inputs
(AHCPTQ's HLUQ / CAG) have nothing to quantize there and must be off unless ``ahcptq.convs`` gives them convolutions."""
from __future__ import annotations

from dataclasses import dataclass

from .base import FLOAT, Method, check_choice

CHOICES = ("quantized", "float")


@dataclass
class InputsSection:
    linear: str = "quantized"  # inputs of the quantized Linear layers: 'quantized' (a_qconfig) or 'float'
    conv: str = "quantized"  # inputs of the quantized Conv2d layers (not ConvTranspose2d): 'quantized' or 'float'

    def check(self, bad, q) -> None:
        check_choice(bad, "inputs.linear", self.linear, CHOICES)
        check_choice(bad, "inputs.conv", self.conv, CHOICES)
        if self.linear == "float" and self.conv == "float" and q.attention.placement == "float":
            bad("inputs", "linear and conv both 'float' with attention.placement 'float' quantize no activation: "
                "for a weight-only model set a_qconfig.bit: null instead")
        on = [k for k, v in (("ahcptq.HLUQ", q.ahcptq.HLUQ), ("ahcptq.CAG", q.ahcptq.CAG)) if v]
        if self.linear == "float" and on and not (q.ahcptq.convs and self.conv == "quantized"):
            bad("inputs.linear", f"'float' leaves every Linear input float, where {' and '.join(on)} would "
                f"quantize: turn {on[0]} off (or give it the convolutions: ahcptq.convs=true)")


def label_note(inputs: dict) -> str:
    """What a run's W<b>A<b> label adds for layer kinds with float inputs (``inputs``: the section as a dict, e.g.
    ``vars(qcfg.inputs)`` or an export manifest's ``q_config["inputs"]``; {} for files without the section)."""
    kinds = [k for k in ("linear", "conv") if inputs.get(k, "quantized") == "float"]
    return f" ({' and '.join(kinds)} inputs float)" if kinds else ""


class LayerInputs(Method):
    name, section, section_cls = "layer_inputs", "inputs", InputsSection
    structural = ("inputs.linear", "inputs.conv")

    def enabled(self, sec, qcfg) -> bool:
        return "float" in (sec.linear, sec.conv)

    def site_quantizer(self, sec, site, ctx, base, **kw):
        if (site == "linear_input" and sec.linear == "float") or (site == "conv_input" and sec.conv == "float"):
            return FLOAT
        return None
