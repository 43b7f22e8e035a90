"""PTQ4SAM toolkit."""
from ._memory import huge_pages_for_tensors, keep_freed_memory

keep_freed_memory()
huge_pages_for_tensors()
