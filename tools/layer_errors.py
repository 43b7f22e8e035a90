"""Where the quantization error of LiteMedSAM sits, layer by layer: each quantized layer's output error from its input
quantizer alone and from its weight quantizer alone, and the whole model's mask-logit error with only some quantizers
on: weights, activations (layer inputs + attention points), layer inputs, attention points (q, k, v, softmax), each
kind of attention point alone, or everything.

The model is calibrated at the q_config's bits without reconstruction (round-to-nearest weights), as in
tools/sensitivity.py. Per layer, on the float forward of the first ``--layer-images`` calibration images: the relative
error ||f(Q(x), W) - f(x, W)||^2 / (n var f(x, W)) ("input") and the same with Q(W) ("weight"). Writes JSON.

    python tools/layer_errors.py --bits 4 --q-options ptq4sam.AGQ=false ptq4sam.BIG=false calibrate=4 \\
        --out docs/results/w4/layer_errors/base.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from sensitivity import add_setup_args, calibrated_setup, logit_error  # noqa: E402

from ptq4sam.errors import command_line  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter  # noqa: E402
from ptq4sam.ptq import quantize_segmenter  # noqa: E402
from ptq4sam.quantization import disable_all, enable_quantization, freeze  # noqa: E402
from ptq4sam.quantization.qmodules import _QuantWeightMixin  # noqa: E402

ATTENTION_POINTS = ("q_quant", "k_quant", "v_quant", "attn_quant")


def _op(layer):
    if isinstance(layer, nn.Linear):
        return lambda x, w: F.linear(x, w, layer.bias)
    if isinstance(layer, nn.ConvTranspose2d):
        return lambda x, w: F.conv_transpose2d(x, w, layer.bias, layer.stride, layer.padding, layer.output_padding,
                                               layer.groups, layer.dilation)
    return lambda x, w: layer._conv_forward(x, w, layer.bias)


@torch.no_grad()
def local_errors(model: nn.Module, run) -> dict:
    """{layer name: {"input": err, "weight": err, "input_quantizer": type}} averaged over the forwards of ``run()``
    (quantizers off for the forward itself; each layer's two quantizers switched on only for its own error). The
    quantized weight is the layer's ``qweight()`` (GPTQ's, where GPTQ ran); the float weight stays the reference."""
    disable_all(model)
    names = {id(m): n for n, m in model.named_modules()}
    acc = {}

    def hook(mod, inp, out):
        x, op = inp[0], _op(mod)
        enable_quantization(mod.input_quant)
        xq = mod.input_quant(x)
        disable_all(mod.input_quant)
        enable_quantization(mod.weight_quantizer)
        wq = mod.qweight()
        disable_all(mod.weight_quantizer)
        ref = op(x, mod.weight)
        den = ref.var().clamp(min=1e-12)
        r = acc.setdefault(names[id(mod)], [0.0, 0.0, 0, type(mod.input_quant.quantizer).__name__])
        r[0] += float((op(xq, mod.weight) - ref).pow(2).mean() / den)
        r[1] += float((op(x, wq) - ref).pow(2).mean() / den)
        r[2] += 1

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _QuantWeightMixin)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: {"input": a / c, "weight": w / c, "input_quantizer": t} for n, (a, w, c, t) in acc.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p)
    p.add_argument("--layer-images", type=int, default=2, help="calibration images the per-layer errors use")
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    qpath, qcfg, samples, base, fp_seg, probe, ref = calibrated_setup(a.bits, a.q_config, a.q_options, a.calib_images)
    seg = BoxPromptSegmenter(base)
    t = time.time()
    quantize_segmenter(seg, samples, qcfg, True, torch.device("cpu"), log=lambda *x: None)
    sam = seg.sam

    def error_with(part: str) -> float:
        disable_all(sam)
        for m in sam.modules():
            if isinstance(m, _QuantWeightMixin):
                if part in ("all", "weights"):
                    enable_quantization(m.weight_quantizer)
                if part in ("all", "activations", "layer_inputs"):
                    enable_quantization(m.input_quant)
        if part in ("all", "activations", "attention"):
            for n, m in sam.named_modules():
                if n.endswith(ATTENTION_POINTS):
                    enable_quantization(m)
        if part.startswith("attention."):  # one kind of attention point alone
            for n, m in sam.named_modules():
                if n.endswith(part.split(".", 1)[1]):
                    enable_quantization(m)
        freeze(sam)
        return logit_error(seg, probe, ref)

    logits = {part: error_with(part) for part in ("all", "weights", "activations", "layer_inputs", "attention")
              + tuple(f"attention.{k}" for k in ATTENTION_POINTS)}
    layers = local_errors(sam, lambda: [seg(s.image, s.boxes) for s in probe[: a.layer_images]])
    enc = [v for n, v in layers.items() if n.startswith("image_encoder")]
    dec = [v for n, v in layers.items() if not n.startswith("image_encoder")]
    doc = {"command": command_line("tools/layer_errors.py", argv),
           "q_config": str(qpath), "q_options": ["recon.iters=0"] + list(a.q_options), "bits": a.bits,
           "seed": qcfg.seed, "calibrate": qcfg.calibrate, "logit_error": logits,
           "sum_input_error": {"encoder": sum(v["input"] for v in enc), "decoder": sum(v["input"] for v in dec)},
           "sum_weight_error": {"encoder": sum(v["weight"] for v in enc), "decoder": sum(v["weight"] for v in dec)},
           "seconds": round(time.time() - t, 1), "layers": layers}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("logit_error", "sum_input_error", "sum_weight_error")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
