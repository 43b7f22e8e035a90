"""Plots of the distributions BIG and AGQ act on, from the real LiteMedSAM model on the bundled calibration images.

- big_<layer>.png: post-k_proj activations of each decoder token->image attention (per tensor, KDE, detected peaks)
  before and after folding gamma = sign(channel mean) into k_proj / q_proj, and a few single channels.
- agq_<layer>.png: post-softmax values of each decoder attention (log x axis) with the AGQ levels s * 2^(-k/tau)
  chosen by the tau search overlaid.

    python tools/plot_distributions.py [--images 8] [--bit 4] [--out docs/figures]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq4sam import coco_eval  # noqa: E402
from ptq4sam.agq import search_tau  # noqa: E402
from ptq4sam.big import channel_signs, detect_bimodal  # noqa: E402
from ptq4sam.models import BoxPromptSegmenter, build_sam  # noqa: E402
from ptq4sam.qconfig import QConfig  # noqa: E402
from ptq4sam.quant_sam import (  # noqa: E402
    build_context,  # noqa: E402
    quant_attentions,
    quantize_sam,
)
from ptq4sam.quantization import disable_all  # noqa: E402
from ptq4sam.samples import gt_box_samples, record  # noqa: E402

DATA = ROOT / "data" / "coco128"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="first N calibration images (by id)")
    p.add_argument("--bit", type=int, default=4, help="bit width of the AGQ levels drawn")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    a = p.parse_args(argv)
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sam = build_sam("lite_medsam")
    seg = BoxPromptSegmenter(sam)
    quantize_sam(sam, build_context(QConfig()), quant_encoder=False)
    disable_all(sam)
    samples = gt_box_samples(coco_eval.load_ann(DATA / "annotations/instances_calib32.json"), DATA / "train2017",
                             a.images)
    atts = quant_attentions(sam.mask_decoder)
    t2i = [a for a in atts if "token_to_image" in a.role]
    kposts = record(seg, samples, t2i, ["k_post"], desc="post-k_proj", rows_per_image=4096)
    rec = record(seg, samples[:2], atts, ["attn", "v"], desc="softmax")
    summary = {"images": a.images, "split": "first images by id of instances_calib32.json", "layers": []}
    for att in atts:
        r = rec[id(att)]
        name = att.role.replace(".", "_")
        entry = {"layer": att.role}
        if "token_to_image" in att.role:
            k = torch.cat(kposts[id(att)]["k_post"]).float()
            det = detect_bimodal(k, max_samples=1 << 16)
            gamma = channel_signs(k)
            after = detect_bimodal(k * gamma, max_samples=1 << 16)
            entry.update(bimodal=det["bimodal"], peaks=det["peaks"], peaks_after=after["peaks"])
            fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
            for axis, vals, d, title in ((ax[0], k, det, "before BIG"), (ax[1], k * gamma, after, "after BIG (gamma folded)")):
                axis.hist(vals.flatten().numpy(), bins=200, density=True, alpha=0.5)
                axis.plot(d["grid"].numpy(), d["density"].numpy(), "k-", lw=1)
                for pk in d["peaks"]:
                    axis.axvline(pk, color="r", ls="--", lw=1)
                axis.set_title(f"{att.role}: {title} ({d['num_peaks']} peak{'s' if d['num_peaks'] != 1 else ''})")
            for c in range(4):
                ax[2].hist(k[:, c].numpy(), bins=80, density=True, alpha=0.5, label=f"channel {c}")
            ax[2].set_title("single channels (before)")
            ax[2].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"big_{name}.png", dpi=90)
            plt.close(fig)
        pairs = list(zip(r["attn"], r["v"]))
        res = search_tau(pairs, a.bit)
        entry.update(agq_tau=res["tau"], agq_scale=res["scale"])
        vals = torch.cat([x.flatten() for x, _ in pairs]).numpy()
        vals = vals[vals > 1e-12]
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.hist(vals, bins=np.logspace(-12, 0, 200), density=True, alpha=0.6)
        ax.set_xscale("log")
        for kk in range(2 ** a.bit):
            ax.axvline(res["scale"] * 2 ** (-kk / res["tau"]), color="r", lw=0.6, alpha=0.7)
        ax.set_title(f"{att.role}: post-softmax, AGQ {a.bit}-bit levels (tau={res['tau']}, s={res['scale']:.3f})")
        fig.tight_layout()
        fig.savefig(out / f"agq_{name}.png", dpi=90)
        plt.close(fig)
        summary["layers"].append(entry)
    (out / "distributions.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
