"""Reading images with a clear error for files that cannot be used (torch-free; same decoder as mmcv.imread).

OpenCV decodes a truncated JPEG "successfully" (the missing part grey, a warning on stderr), so a file is also
checked for its end marker: JPEG ends with EOI (FF D9), PNG with its IEND chunk. A few bytes of trailing padding
after the marker are accepted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ImageReadError

_TAIL = 64  # bytes read from the end of a file to find its end marker


def problem(path) -> Optional[str]:
    """Why ``path`` cannot be used as an image (missing, empty, truncated), or None. Reads only the file's tail."""
    p = Path(path)
    if not p.is_file():
        return "file not found"
    size = p.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with open(p, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - _TAIL))
        tail = f.read()
    if head[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in tail:
        return f"truncated JPEG (no end-of-image marker FF D9 in its last {_TAIL} bytes; {size} bytes on disk)"
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        return f"truncated PNG (no IEND chunk at its end; {size} bytes on disk)"
    return None


def check(path) -> None:
    """Raise :class:`ImageReadError` if :func:`problem` finds one."""
    why = problem(path)
    if why:
        raise ImageReadError(path, why)


def read_rgb(path) -> np.ndarray:
    """HxWx3 uint8 RGB, or :class:`ImageReadError` naming the file and why."""
    import cv2  # noqa: PLC0415

    check(path)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(path, "cannot be decoded as an image (not an image file, or corrupt)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
