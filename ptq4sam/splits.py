"""The three named splits of the bundled data, and what each may be used for.

- ``calib``: the images calibration uses, the first 16 by COCO id of ``instances_calib32.json``
  (``instances_calib16.json``; the demo budget's ``calibrate: 16``).
- ``dev``: the other 16 images of ``instances_calib32.json`` (``instances_dev16.json``), never calibrated on: every
  choice (which switches form a recipe, their hyperparameters) is made on it.
- ``test``: ``instances_eval96.json`` (96 images), run once per final recipe; every reported number is on it.

The three are disjoint (tested). ``tools/make_coco128_split.py`` writes the files from the shared coco128.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from .errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "coco128"
IMAGES = DATA / "train2017"


@dataclass(frozen=True)
class Split:
    name: str
    ann_file: Path
    purpose: str


SPLITS: Dict[str, Split] = {
    "calib": Split("calib", DATA / "annotations" / "instances_calib16.json", "calibration (first 16 by id)"),
    "dev": Split("dev", DATA / "annotations" / "instances_dev16.json", "choices: recipes and hyperparameters"),
    "test": Split("test", DATA / "annotations" / "instances_eval96.json", "reported numbers, once per final recipe"),
}
CALIB_MAX = 16  # a run on this protocol may calibrate on at most the calib split's images


def split(name: str) -> Split:
    if name not in SPLITS:
        raise InputError(f"unknown split {name!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[name]
