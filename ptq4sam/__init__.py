"""PTQ4SAM toolkit."""
