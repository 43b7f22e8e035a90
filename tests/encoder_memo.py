"""The test suite's memo of float image-encoder embeddings (installed session-wide by ``conftest.py``)."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ptq4sam.errors import atomic_write
from ptq4sam.models.segmenter import BoxPromptSegmenter

_PLAIN = (int, float, bool, str, tuple, type(None))
ORIGINAL_ENCODE = BoxPromptSegmenter.encode  # (this module is imported before the memo is installed)


class FloatEncoderMemo:
    """Within a test run, a float image encoder's embedding of an image is computed once.

    The image encoder dominates this suite's time, and most tests quantize the decoder only: the FP baseline, the
    calibration and the quantized evaluation of each CLI run then encode the same images with the same float encoder.
    ``BoxPromptSegmenter.encode`` returns a copy of the stored embedding when the call would compute exactly the
    same thing again, and runs the encoder otherwise. "The same" is:
    - the same image (its bytes, shape and dtype) and preprocessing (the segmenter's class, input size, resize
      target, normalisation, the model's class, pixel mean / std);
    - an encoder of the same structure (its ``repr``, every module's class, ``forward`` and plain attributes such
      as strides, epsilons or head counts) whose parameters and buffers (persistent or not) hold the same bytes in
      the same memory format;
    - the same torch thread count, oneDNN switch and CPU autocast state.
    It stays out of the way whenever the outcome could differ from a stored one:
    - an encoder holding any toolkit module (a quantized layer or quantizer), or any forward / backward hook;
    - a module in training mode, or with a ``forward`` replaced on the instance (tests that count encoder runs do
      that);
    - a gradient that would be needed: grad mode on and some parameter requiring grad;
    - a segmenter whose ``prepare_image`` is not ``BoxPromptSegmenter``'s, or not on the CPU;
    - an encoder larger than ``max_elements`` (hashing it would cost more than it saves).
    Entries are kept in memory (the last ``max_entries``) and in ``folder``, shared by the run's pytest-xdist
    workers (written atomically; a file that cannot be read or written is a miss)."""

    def __init__(self, folder: Optional[Path], max_entries: int = 48, max_elements: int = 20_000_000):
        self.folder, self.max_entries, self.max_elements = folder, max_entries, max_elements
        self.store: "OrderedDict[str, tuple]" = OrderedDict()
        self.hits = self.misses = 0

    def key(self, seg, image: np.ndarray) -> Optional[str]:
        enc = seg.sam.image_encoder
        g = torch.nn.modules.module
        if type(seg).prepare_image is not BoxPromptSegmenter.prepare_image or seg.device.type != "cpu":
            return None
        if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks):
            return None
        tensors = list(enc.named_parameters()) + list(enc.named_buffers())
        if sum(t.numel() for _, t in tensors) > self.max_elements:
            return None
        structure = []
        for name, m in enc.named_modules():
            if (type(m).__module__.startswith("ptq4sam") or m.training or "forward" in m.__dict__ or m._forward_hooks
                    or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
                return None
            plain = sorted((k, v) for k, v in vars(m).items() if isinstance(v, _PLAIN) and not k.startswith("_"))
            fwd = type(m).forward
            structure.append((name, type(m).__module__, type(m).__qualname__, fwd.__module__, fwd.__qualname__, plain))
        if torch.is_grad_enabled() and any(p.requires_grad for p in enc.parameters()):
            return None
        h = hashlib.sha1()
        h.update(repr((image.shape, str(image.dtype), type(seg).__qualname__, type(seg.sam).__qualname__,
                       seg.img_size, seg.transform.target_length, seg.normalize, str(seg.device),
                       torch.get_num_threads(), torch.backends.mkldnn.enabled, torch.is_autocast_enabled("cpu"),
                       repr(enc), structure)).encode())
        h.update(np.ascontiguousarray(image).tobytes())
        for name, t in tensors + [("pixel_mean", seg.sam.pixel_mean), ("pixel_std", seg.sam.pixel_std)]:
            t = t.detach().cpu()
            h.update(repr((name, tuple(t.shape), tuple(t.stride()), str(t.dtype))).encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def _remember(self, k: str, entry: tuple) -> None:
        self.store[k] = entry
        self.store.move_to_end(k)
        while len(self.store) > self.max_entries:
            self.store.popitem(last=False)

    def _load(self, k: str) -> Optional[tuple]:
        path = self.folder / f"{k}.pt" if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            saved = torch.load(path, weights_only=True)
            return saved["embedding"], tuple(saved["resized"]), tuple(saved["original"])
        except Exception:  # noqa: BLE001 - a damaged file is a miss
            return None

    def _save(self, k: str, entry: tuple) -> None:
        if self.folder is None:
            return
        emb, resized, original = entry
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / f"{k}.pt", lambda tmp: torch.save(
                {"embedding": emb, "resized": list(resized), "original": list(original)}, tmp))
        except OSError:  # a full or read-only disk: memory only
            pass

    def encode(self, compute, seg, image: np.ndarray):
        """``compute(seg, image)`` (the real ``encode``), or the stored outcome of an identical call."""
        k = self.key(seg, image)
        if k is None:
            return compute(seg, image)
        entry = self.store.get(k) or self._load(k)
        if entry is not None:
            self.hits += 1
            self._remember(k, entry)
            emb, resized, original = entry
            return emb.clone(), resized, original
        self.misses += 1
        emb, resized, original = compute(seg, image)
        entry = (emb.detach().clone(), tuple(resized), tuple(original))
        self._remember(k, entry)
        self._save(k, entry)
        return emb, resized, original

    def install(self, monkeypatch) -> None:
        memo = self
        monkeypatch.setattr(BoxPromptSegmenter, "encode", lambda seg, image: memo.encode(ORIGINAL_ENCODE, seg, image))
