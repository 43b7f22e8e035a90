"""Deployment: compact integer checkpoints (``compact``)."""
from .compact import COMPACT_FORMAT, CompactInfo, load_compact, save_compact

__all__ = ["COMPACT_FORMAT", "CompactInfo", "load_compact", "save_compact"]
