"""Builds the CPU multi-scale deformable attention op (as the paper repo's ops/setup.py does for CUDA):

    cd projects/instance_segment_anything/ops && python setup.py build_ext --inplace

Optional: without it the pure-PyTorch path runs on CPU (same numbers; tests/test_detr.py compares them), and on
CUDA mmcv-full's compiled kernel is used when mmcv was built with CUDA.
"""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="ptq4sam_ms_deform_attn",
    ext_modules=[CppExtension("ms_deform_attn_cpu", ["src/ms_deform_attn_cpu.cpp"], extra_compile_args=["-O3"])],
    cmdclass={"build_ext": BuildExtension},
)
