from .det_wrapper_instance_sam import DetWrapperInstanceSAM
from .detr import DETRPrompts  # noqa: E402  (registers the "detr" prompt source)
from .prompt_sources import PROMPT_SOURCES, DetectorPrompts, GTBoxPrompts, JsonPrompts

__all__ = ["DetWrapperInstanceSAM", "PROMPT_SOURCES", "DETRPrompts", "DetectorPrompts", "GTBoxPrompts", "JsonPrompts"]
