from .sam_builder import SAM_BUILDERS, CheckpointError, SamSpec, build_sam
from .segmenter import BoxPromptSegmenter

__all__ = ["SAM_BUILDERS", "CheckpointError", "SamSpec", "build_sam", "BoxPromptSegmenter"]
