from setuptools import find_packages, setup

setup(
    name="ptq4sam",
    version="0.1.0",
    description="Post-training quantization of the Segment Anything Model (PTQ4SAM re-implementation)",
    packages=find_packages(include=["ptq4sam", "ptq4sam.*", "projects", "projects.*"]),
    python_requires=">=3.10",
)
