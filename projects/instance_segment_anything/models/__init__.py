from .det_wrapper_instance_sam import DetWrapperInstanceSAM
from .prompt_sources import PROMPT_SOURCES, DetectorPrompts, GTBoxPrompts, JsonPrompts

__all__ = ["DetWrapperInstanceSAM", "PROMPT_SOURCES", "DetectorPrompts", "GTBoxPrompts", "JsonPrompts"]
