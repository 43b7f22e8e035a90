"""The suite's float-encoder memo (tests/encoder_memo.py) returns only what a fresh encoding would."""
import numpy as np
import torch
from encoder_memo import ORIGINAL_ENCODE, FloatEncoderMemo

from ptq4sam.models import BoxPromptSegmenter, build_sam
from ptq4sam.quantization import MinMaxObserver


def test_encoder_memo_reuses_only_identical_float_encodings(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("vit_b", random_init=True, image_size=64)
    sam.image_encoder.blocks = sam.image_encoder.blocks[:1]
    enc = sam.image_encoder.eval()  # (the sliced ModuleList is a new module, in training mode)
    seg = BoxPromptSegmenter(sam)
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    memo = FloatEncoderMemo(tmp_path)

    def fresh():
        return ORIGINAL_ENCODE(seg, img)[0]

    with torch.no_grad():
        a = memo.encode(ORIGINAL_ENCODE, seg, img)[0]
        b = memo.encode(ORIGINAL_ENCODE, seg, img)[0]
        assert (memo.misses, memo.hits) == (1, 1) and torch.equal(a, b) and torch.equal(b, fresh())
        b.add_(1.0)  # a caller changing its copy leaves the stored one
        assert torch.equal(memo.encode(ORIGINAL_ENCODE, seg, img)[0], a)
        other = FloatEncoderMemo(tmp_path)  # the other pytest-xdist worker reads the file
        assert torch.equal(other.encode(ORIGINAL_ENCODE, seg, img)[0], a) and other.hits == 1
        assert memo.encode(ORIGINAL_ENCODE, seg, img[:, ::-1].copy())[0].shape == a.shape and memo.misses == 2
        enc.neck[0].weight.mul_(2.0)  # a weight changed in place: another key, the new embedding
        c = memo.encode(ORIGINAL_ENCODE, seg, img)[0]
        assert memo.misses == 3 and not torch.equal(c, a) and torch.equal(c, fresh())
        k = memo.key(seg, img)
        enc.neck[1].eps = 1e-3  # a plain attribute (not a tensor) is part of the key
        assert memo.key(seg, img) not in (None, k)
        enc.neck[1].eps = 1e-6
        assert memo.key(seg, img) == k
        # where a stored embedding could differ from the encoder's outcome, the memo stays out of the way
        hook = enc.blocks[0].register_forward_hook(lambda *args: None)
        assert memo.key(seg, img) is None
        hook.remove()
        enc.blocks[0].train()
        assert memo.key(seg, img) is None
        enc.blocks[0].eval()
        enc.forward = lambda x: x
        assert memo.key(seg, img) is None
        del enc.forward
        enc.observer = MinMaxObserver(8, False, -1)  # a toolkit module inside the encoder
        assert memo.key(seg, img) is None
        del enc.observer
        assert memo.key(seg, img) == k
    with torch.enable_grad():  # a gradient through the encoder's parameters would be needed
        assert memo.key(seg, img) is None
