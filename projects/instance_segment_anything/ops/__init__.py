from .ms_deform_attn import load_cpu_extension, ms_deform_attn  # noqa: F401
