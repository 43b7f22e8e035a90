"""Multi-scale deformable attention core with three interchangeable implementations.

- ``cuda``: mmcv-full's compiled kernel (``MultiScaleDeformableAttnFunction``), when mmcv was built with CUDA;
- ``cpu``: our C++ op (``src/ms_deform_attn_cpu.cpp``), built in place by ``setup.py`` or JIT-compiled by
  :func:`load_cpu_extension`;
- ``pytorch``: mmcv's pure-PyTorch ``multi_scale_deformable_attn_pytorch`` (grid_sample), available everywhere.

``impl='auto'`` picks cuda for CUDA tensors, else the CPU op if it is built, else pytorch. They compute the same
function (tests/test_detr.py compares them on random inputs).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch

_HERE = Path(__file__).resolve().parent
_cpu_ext = None


def load_cpu_extension(build: bool = False, verbose: bool = False):
    """The compiled CPU op: imported if built in place, else JIT-compiled (cached) when ``build``; None otherwise."""
    global _cpu_ext
    if _cpu_ext is not None:
        return _cpu_ext
    sys.path.insert(0, str(_HERE))
    try:
        _cpu_ext = importlib.import_module("ms_deform_attn_cpu")
    except ImportError:
        if build:
            from torch.utils.cpp_extension import load  # noqa: PLC0415

            build_dir = Path(os.environ.get("PTQ4SAM_OPS_BUILD", Path.home() / ".cache" / "ptq4sam" / "ops"))
            build_dir.mkdir(parents=True, exist_ok=True)
            _cpu_ext = load("ms_deform_attn_cpu", [str(_HERE / "src" / "ms_deform_attn_cpu.cpp")],
                            extra_cflags=["-O3"], build_directory=str(build_dir), verbose=verbose)
    finally:
        sys.path.remove(str(_HERE))
    return _cpu_ext


def _mmcv_cuda_available() -> bool:
    try:
        from mmcv.ops.multi_scale_deform_attn import ext_module  # noqa: F401, PLC0415
    except Exception:  # pragma: no cover - mmcv without ops
        return False
    return torch.cuda.is_available()


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor, impl: str = "auto",
                   im2col_step: int = 64) -> torch.Tensor:
    """value (B, S, heads, D); sampling_locations (B, Q, heads, L, P, 2) in [0, 1]; attention_weights
    (B, Q, heads, L, P) -> (B, Q, heads * D)."""
    if impl == "auto":
        if value.is_cuda and _mmcv_cuda_available():
            impl = "cuda"
        elif not value.is_cuda and load_cpu_extension() is not None:
            impl = "cpu"
        else:
            impl = "pytorch"
    if impl == "cuda":
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction  # noqa: PLC0415

        return MultiScaleDeformableAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                                      attention_weights, im2col_step)
    if impl == "cpu":
        ext: Optional[object] = load_cpu_extension()
        if ext is None:
            raise RuntimeError("the CPU ms_deform_attn op is not built: run `python setup.py build_ext --inplace` in "
                               f"{_HERE} or call load_cpu_extension(build=True)")
        return ext.ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights)
    if impl == "pytorch":
        from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch  # noqa: PLC0415

        return multi_scale_deformable_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    raise ValueError(f"ms_deform_attn: impl must be auto, cuda, cpu or pytorch, got {impl!r}")
