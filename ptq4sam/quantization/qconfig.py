"""Quantizer configuration: names a fake quantizer *and* an observer (as torch.ao's QConfig does)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional

from .fake_quant import QUANTIZERS, FakeQuantizeBase
from .observer import OBSERVERS


@dataclass(frozen=True)
class QuantizerConfig:
    quantizer: str = "LSQFakeQuantize"
    observer: str = "AvgMSEObserver"
    bit: Optional[int] = 8  # None = off (the float value passes through)
    symmetric: bool = False
    ch_axis: int = -1
    observer_kwargs: Dict[str, Any] = field(default_factory=dict)
    quantizer_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer: unknown '{self.quantizer}', expected one of {sorted(QUANTIZERS)}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer: unknown '{self.observer}', expected one of {sorted(OBSERVERS)}")
        if self.bit is not None and not (isinstance(self.bit, int) and 2 <= self.bit <= 16):
            raise ValueError(f"bit: expected an integer in 2..16 or 'off', got {self.bit!r}")

    def with_(self, **kw) -> "QuantizerConfig":
        return replace(self, **kw)


def build_quantizer(cfg: QuantizerConfig) -> Optional[FakeQuantizeBase]:
    """A fake quantizer with its observer, or None when ``cfg.bit`` is None (off)."""
    if cfg.bit is None:
        return None
    obs = OBSERVERS[cfg.observer](bit=cfg.bit, symmetric=cfg.symmetric, ch_axis=cfg.ch_axis, **cfg.observer_kwargs)
    return QUANTIZERS[cfg.quantizer](obs, bit=cfg.bit, symmetric=cfg.symmetric, ch_axis=cfg.ch_axis,
                                     **cfg.quantizer_kwargs)
