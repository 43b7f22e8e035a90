"""Cache of weight ranges: a weight is observed once, and its MSE range search (the paper's 2-D search over ranges x
zero points) is the most expensive part of calibration on a CPU. The chosen (min, max) per channel is a deterministic
function of the weight's bytes, the observer's settings and the observers' code, so it is stored under a hash of the
three and reused by any later run (another bit width, observer or version of the search is another key).

Location: ``$PTQ4SAM_CACHE_DIR/weight_ranges`` (default ``~/.cache/ptq4sam/weight_ranges``);
``PTQ4SAM_WEIGHT_CACHE=off`` disables it. Files are written atomically and read with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import atomic_write
from .observer import ObserverBase


def _code_version() -> str:
    """A hash of the code whose results are cached (the observers' searches, this file): a change to a search is a
    new key, never a stale hit from a warm cache."""
    from . import observer  # noqa: PLC0415

    h = hashlib.sha1()
    for f in (Path(observer.__file__), Path(__file__)):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


VERSION = _code_version()


def cache_dir() -> Optional[Path]:
    if os.environ.get("PTQ4SAM_WEIGHT_CACHE", "on").lower() in ("off", "0", "false", "no"):
        return None
    root = os.environ.get("PTQ4SAM_CACHE_DIR") or str(Path.home() / ".cache" / "ptq4sam")
    return Path(root) / "weight_ranges"


def _key(obs: ObserverBase, w: torch.Tensor) -> str:
    h = hashlib.sha1()
    wc = w.detach().to("cpu", torch.float32).contiguous()
    h.update(wc.numpy().tobytes())
    settings = {k: v for k, v in sorted(vars(obs).items()) if not k.startswith("_") and k not in ("training",)
                and isinstance(v, (int, float, str, bool, type(None)))}
    settings.pop("num_batches", None)
    settings.pop("one_side", None)
    h.update(repr((VERSION, type(obs).__name__, tuple(wc.shape), settings)).encode())
    return h.hexdigest()


@torch.no_grad()
def observe_weight(obs: ObserverBase, w: torch.Tensor) -> None:
    """``obs(w)``, or its cached outcome (min_val, max_val) when the same weight was observed the same way before."""
    d = cache_dir()
    path = d / f"{_key(obs, w)}.pt" if d is not None else None
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location=w.device, weights_only=True)
            obs.min_val, obs.max_val = saved["min_val"], saved["max_val"]
            obs.num_batches = 1
            return
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed and rewritten
            pass
    obs(w)
    if path is not None:
        try:
            ranges = {"min_val": obs.min_val.cpu(), "max_val": obs.max_val.cpu()}
            atomic_write(path, lambda tmp: torch.save(ranges, tmp))
        except OSError:  # a read-only home: no cache, same result
            pass
