"""mmdet 2.x plugin: a prompt detector wired to SAM as a box-prompted instance segmenter."""
from .models import PROMPT_SOURCES, DetWrapperInstanceSAM  # noqa: F401  (registers into mmdet's DETECTORS)

__all__ = ["DetWrapperInstanceSAM", "PROMPT_SOURCES"]
