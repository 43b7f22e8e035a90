"""Convert the official YOLOX-Nano ONNX export into an mmdet 2.x YOLOX-Nano checkpoint.

The ONNX graph holds 113 Conv nodes with BatchNorm fused in. We walk them in graph order against the mmdet model's
convolutions in the official YOLOX forward order (checking every shape and the head's readable names), load each
fused conv as weight + bias with an identity BatchNorm, and finally check that the converted model's raw head
output equals the ONNX model's on a real image.

    python tools/convert_yolox_nano_onnx.py [--onnx ../shared/models/yolox_nano/yolox_nano.onnx]
                                            [--out ckpt/yolox_nano_coco_from_onnx.pth]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_ONNX = ROOT.parent / "shared" / "models" / "yolox_nano" / "yolox_nano.onnx"
DEFAULT_OUT = ROOT / "ckpt" / "yolox_nano_coco_from_onnx.pth"
CONFIG = ROOT / "mmdetection" / "configs" / "yolox" / "yolox_nano_8x8_300e_coco.py"


# max |mmdet - onnx| / max |onnx| allowed: float32 rounding of two implementations, whose kernels differ per CPU
# (4.3e-5 and 1.1e-4 on the two check images on an AVX2 AMD EPYC); a wrong weight mapping is orders of magnitude off
MATCH_TOL = 3e-4

def build_model():
    from mmcv import Config  # noqa: PLC0415
    from mmdet.models import build_detector  # noqa: PLC0415

    cfg = Config.fromfile(str(CONFIG))
    model = build_detector(cfg.model)
    return model.eval()


def official_conv_order(model) -> list:
    """mmdet YOLOX convs (names) in the order the official YOLOX forward (and so the ONNX graph) visits them."""
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        feats = model.neck(model.backbone(torch.zeros(1, 3, 64, 64)))
    for h in hooks:
        h.remove()
    # official CSPLayer runs conv1 (= mmdet main_conv) before conv2 (= short_conv)
    for i, n in enumerate(list(order)):
        if ".short_conv." in n:
            j = order.index(n.replace(".short_conv.", ".main_conv."))
            if j > i:
                order[i], order[j] = order[j], order[i]
    neck_out = [n for n in order if n.startswith("neck.out_convs.")]
    order = [n for n in order if n not in neck_out]
    head = model.bbox_head
    for lvl in range(len(feats)):
        order.append(f"neck.out_convs.{lvl}.conv")  # official: head.stems
        for part in ("multi_level_cls_convs", "multi_level_conv_cls", "multi_level_reg_convs",
                     "multi_level_conv_reg", "multi_level_conv_obj"):
            sub = getattr(head, part)[lvl]
            order += [f"bbox_head.{part}.{lvl}" + (f".{n}" if n else "")
                      for n, m in sub.named_modules() if isinstance(m, nn.Conv2d)]
    return order


HEAD_NAMES = {"multi_level_conv_cls": "cls_preds", "multi_level_conv_reg": "reg_preds",
              "multi_level_conv_obj": "obj_preds"}


def convert(onnx_path: Path):
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} not found (see ../shared/README.md: models/yolox_nano/yolox_nano.onnx)")
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    model = build_model()
    modules = dict(model.named_modules())
    order = official_conv_order(model)
    if len(order) != len(convs):
        raise ValueError(f"ONNX has {len(convs)} Conv nodes, mmdet YOLOX-Nano has {len(order)} convolutions")
    with torch.no_grad():
        for node, name in zip(convs, order):
            conv = modules[name]
            w = torch.from_numpy(inits[node.input[1]].copy())
            b = torch.from_numpy(inits[node.input[2]].copy())
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{node.name} {tuple(w.shape)} does not fit {name} {tuple(conv.weight.shape)}")
            for part, official in HEAD_NAMES.items():
                if f".{part}." in name + "." and not node.input[1].startswith(f"head.{official}."):
                    raise ValueError(f"{node.name} ({node.input[1]}) should be head.{official}.* for {name}")
            conv.weight.copy_(w)
            parent_name = name.rsplit(".", 1)[0]
            parent = modules.get(parent_name)
            bn = getattr(parent, "bn", None) if parent is not None else None
            if conv.bias is not None:
                conv.bias.copy_(b)
            elif isinstance(bn, nn.BatchNorm2d):  # identity BN carrying the fused bias: (x-0)/sqrt(1-eps+eps)*1+b
                bn.weight.fill_(1.0)
                bn.bias.copy_(b)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            else:
                raise ValueError(f"{name} has neither a bias nor a BatchNorm to carry the fused bias")
    return model


def raw_head_output(model, x: torch.Tensor) -> torch.Tensor:
    """The ONNX model's output layout: (1, sum HW, 4 reg + obj sigmoid + 80 cls sigmoid)."""
    cls, reg, obj = model.bbox_head(model.neck(model.backbone(x)))
    outs = [torch.cat([r, o.sigmoid(), c.sigmoid()], 1).flatten(2) for c, r, o in zip(cls, reg, obj)]
    return torch.cat(outs, 2).permute(0, 2, 1)


def letterbox(img_bgr: np.ndarray, size: int = 416) -> np.ndarray:
    import cv2  # noqa: PLC0415

    r = min(size / img_bgr.shape[0], size / img_bgr.shape[1])
    resized = cv2.resize(img_bgr, (int(img_bgr.shape[1] * r), int(img_bgr.shape[0] * r)),
                         interpolation=cv2.INTER_LINEAR).astype(np.float32)
    out = np.full((size, size, 3), 114.0, np.float32)
    out[: resized.shape[0], : resized.shape[1]] = resized
    return out.transpose(2, 0, 1)[None]


def check_against_onnx(model, onnx_path: Path, image: Path) -> float:
    import cv2  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    x = letterbox(cv2.imread(str(image)))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = raw_head_output(model, torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", default=str(DEFAULT_ONNX))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--check-image", default=str(ROOT / "data" / "coco128" / "train2017" / "000000000009.jpg"))
    a = p.parse_args(argv)
    model = convert(Path(a.onnx))
    err = check_against_onnx(model, Path(a.onnx), Path(a.check_image))
    print(f"max |mmdet - onnx| / max|onnx| on {Path(a.check_image).name}: {err:.2e}")
    if err > MATCH_TOL:
        raise SystemExit(f"converted model disagrees with the ONNX model (relative error {err:.2e})")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": {"source": str(a.onnx), "converter": Path(__file__).name}},
               out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
