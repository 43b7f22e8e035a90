"""DETR-family prompt detectors: H-Deformable-DETR (R50 / Swin-T / Swin-L) and DINO (FocalNet-L)."""
from .convert import CheckpointKeyError, from_official, load_official, to_official  # noqa: F401
from .dino import DINO  # noqa: F401
from .focalnet import FocalNet  # noqa: F401
from .hdetr import HDeformableDETR  # noqa: F401
from .prompt import DETR_MODELS, DETRPrompts, build_detr  # noqa: F401
