"""Bundle the shared coco128 images into data/coco128 with the fixed split used by every number we report.

Split (documented in data/README.md and ptq4sam/splits.py): images sorted by COCO id; calibration = first 32,
evaluation = the other 96 (the ``test`` split); the calibration part is split again into ``calib`` (its first
``--num-dev``-th complement, 16) and ``dev`` (its last 16), disjoint.

    python tools/make_coco128_split.py [--src ../shared/data/coco128] [--dst data/coco128] [--num-calib 32] [--num-dev 16]
"""
import argparse
import json
import shutil
from pathlib import Path


def split_coco(ann: dict, num_calib: int, num_dev: int = 0):
    if "categories" not in ann:
        raise ValueError("annotation file has no 'categories' list")
    images = sorted(ann["images"], key=lambda im: im["id"])
    if not 0 < num_calib < len(images):
        raise ValueError(f"--num-calib must be in 1..{len(images) - 1}, got {num_calib}")
    if not 0 <= num_dev < num_calib:
        raise ValueError(f"--num-dev must be in 0..{num_calib - 1}, got {num_dev}")
    parts = {"calib": images[:num_calib], "eval": images[num_calib:]}
    if num_dev:  # calib = its first images, dev = its last num_dev: disjoint
        parts["calib_only"] = images[:num_calib - num_dev]
        parts["dev"] = images[num_calib - num_dev:num_calib]
    out = {}
    for name, imgs in parts.items():
        ids = {im["id"] for im in imgs}
        out[name] = {
            "info": ann.get("info", {}),
            "licenses": ann.get("licenses", []),
            "images": imgs,
            "annotations": [a for a in ann["annotations"] if a["image_id"] in ids],
            "categories": ann["categories"],
        }
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    p.add_argument("--src", default=str(root.parent / "shared" / "data" / "coco128"))
    p.add_argument("--dst", default=str(root / "data" / "coco128"))
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--num-dev", type=int, default=16)
    a = p.parse_args()
    src, dst = Path(a.src), Path(a.dst)
    ann_path = src / "instances_train2017_coco128.json"
    if not ann_path.is_file():
        raise SystemExit(f"{ann_path} not found: point --src at the coco128 folder (see ../shared/README.md)")
    ann = json.loads(ann_path.read_text())
    parts = split_coco(ann, a.num_calib, a.num_dev)
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    (dst / "train2017").mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        n = len(part["images"])
        path = dst / "annotations" / f"instances_{name.replace('_only', '')}{n}.json"
        path.write_text(json.dumps(part))
        print(f"{path}: {n} images, {len(part['annotations'])} annotations")
    for im in ann["images"]:
        shutil.copy2(src / "train2017" / im["file_name"], dst / "train2017" / im["file_name"])
    print(f"copied {len(ann['images'])} images to {dst / 'train2017'}")


if __name__ == "__main__":
    main()
