"""What the CPU offers an int8 runtime, read from ``/proc/cpuinfo`` (torch-free): its model name and the
instruction-set extensions that decide whether int8 kernels can beat FP32 (AVX2 only: fewer bytes and fusion at best;
VNNI: int8 dot products; AMX: int8 / bf16 tile matrix multiplies). Every deployment table and JSON records it."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Dict, List, Optional

# /proc/cpuinfo flag -> the name the tables use, in the order they are listed
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
             ("amx_int8", "AMX-INT8"), ("amx_bf16", "AMX-BF16"))


def parse_cpuinfo(text: str) -> Dict[str, object]:
    """``{"model": ..., "isa": [...], "int8_dot": "AMX" | "VNNI" | "none"}`` of a ``/proc/cpuinfo`` text (its first
    processor; the machines here have one kind of core)."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    isa: List[str] = [name for flag, name in ISA_FLAGS if flag in flags]
    dot = "AMX" if "amx_int8" in flags else "VNNI" if flags & {"avx512_vnni", "avx_vnni"} else "none"
    return {"model": model, "isa": isa, "int8_dot": dot}


def cpu_info(path: Optional[str] = "/proc/cpuinfo") -> Dict[str, object]:
    """:func:`parse_cpuinfo` of this machine (where there is no ``/proc/cpuinfo``: the platform's processor name and
    an unknown ISA)."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return {"model": platform.processor() or platform.machine(), "isa": [], "int8_dot": "unknown"}


def int8_pairs_saturate(info: Optional[Dict[str, object]] = None) -> bool:
    """Whether the int8 runtimes multiply uint8 by int8 here with an instruction whose 16-bit pair sums saturate on
    full-range 8-bit weights (no VNNI / AMX int8 dot product): where exports store Linear weights as uint8
    (``export_sam(u8_linear_weights=...)``) and ONNX Runtime's quantizer is given ``reduce_range``."""
    return (info or cpu_info())["int8_dot"] == "none"


def describe(info: Dict[str, object]) -> str:
    """One line for a table's header: ``Intel Xeon (AVX2, AVX-512, AVX512-VNNI; int8 dot products: VNNI)``."""
    isa = ", ".join(info["isa"]) or "no AVX2"
    return f"{info['model']} ({isa}; int8 dot products: {info['int8_dot']})"
