"""PTQ4SAM toolkit."""
from ._memory import keep_freed_memory

keep_freed_memory()
