"""Official DETR-family release checkpoints <-> our modules, loaded strictly.

Our transformer / head modules carry the official names, so only the backbone is renamed:

- ``resnet``: torchvision ResNet with FrozenBatchNorm (``backbone.0.body.*``) <-> mmdet ``ResNet`` (``backbone.*``;
  mmdet's BN has ``num_batches_tracked``, which the frozen BN lacks);
- ``swin``: the official Swin detection backbone (``backbone.0.body.*``) <-> mmdet ``SwinTransformer`` via mmdet's own
  ``swin_converter`` and its exact inverse;
- ``focalnet``: microsoft/FocalNet's detection backbone (``backbone.0.*``) <-> our ``FocalNet`` (same names).

A key that does not match, or a shape that differs, is an error listing the keys; nothing loads partially.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional

import torch
from mmdet.models.utils.ckpt_convert import swin_converter

from ptq4sam.errors import InputNotFound, UnknownName
from ptq4sam.models.sam_builder import CheckpointError, key_mismatch_report, load_weights_file

OFFICIAL_PREFIX = {"resnet": "backbone.0.body.", "swin": "backbone.0.body.", "focalnet": "backbone.0."}


class CheckpointKeyError(UnknownName):
    """Keys of a release checkpoint that do not match the model (KeyError without the quotes; a user error)."""


def _swin_unreorder(x: torch.Tensor) -> torch.Tensor:
    """Inverse of swin_converter's correct_unfold_{reduction,norm}_order (the [0, 2, 1, 3] group permutation)."""
    if x.dim() == 2:
        o, c = x.shape
        return x.reshape(o, c // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(o, c)
    c = x.shape[0]
    return x.reshape(c // 4, 4).transpose(0, 1)[[0, 2, 1, 3], :].reshape(c)


def _swin_to_official(k: str, v: torch.Tensor):
    if k.startswith("patch_embed."):
        return k.replace("patch_embed.projection", "patch_embed.proj"), v
    if not k.startswith("stages."):
        return k, v
    k = k.replace("stages.", "layers.", 1)
    if ".downsample." in k:
        return k, _swin_unreorder(v)
    k = k.replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
    return k, v


def to_official(state: Dict[str, torch.Tensor], backbone: str) -> "OrderedDict[str, torch.Tensor]":
    """Our state dict -> the release layout (what ``torch.load(ckpt)['model']`` holds)."""
    prefix = OFFICIAL_PREFIX[backbone]
    out = OrderedDict()
    for k, v in state.items():
        if not k.startswith("backbone."):
            out[k] = v
            continue
        k = k[len("backbone."):]
        if backbone == "resnet" and k.endswith("num_batches_tracked"):
            continue
        if backbone == "swin":
            k, v = _swin_to_official(k, v)
        out[prefix + k] = v
    return out


def from_official(state: Dict[str, torch.Tensor], backbone: str) -> "OrderedDict[str, torch.Tensor]":
    """The release layout -> our state dict (inverse of :func:`to_official`)."""
    if backbone not in OFFICIAL_PREFIX:
        raise ValueError(f"backbone kind must be one of {sorted(OFFICIAL_PREFIX)}, got {backbone!r}")
    prefix = OFFICIAL_PREFIX[backbone]
    out, bb = OrderedDict(), OrderedDict()
    for k, v in state.items():
        if k.startswith(prefix):
            bb[k[len(prefix):]] = v
        else:
            out[k] = v
    if backbone == "swin":
        bb = OrderedDict((k[len("backbone."):], v) for k, v in swin_converter(bb).items())
    for k, v in bb.items():
        out["backbone." + k] = v
        if backbone == "resnet" and k.endswith("running_mean"):
            out["backbone." + k[: -len("running_mean")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def check_keys(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointKeyError` listing missing / unexpected keys and shape mismatches."""
    report = key_mismatch_report(model, state, source)
    if report:
        raise CheckpointKeyError(report + "\n  Is the checkpoint the release file this config names (see ckpt/README.md)?")


def load_official(model: torch.nn.Module, path: str, backbone: str, download: Optional[str] = None) -> None:
    """Load a release checkpoint (``{'model': state_dict, ...}`` or a bare state dict) strictly into ``model``."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"detector checkpoint not found: {path} — download {download or 'it'} and put it "
                                "there (see ckpt/README.md)")
    # tensors only (no code runs); the release files also hold their training arguments as an argparse.Namespace
    ckpt = load_weights_file(p, "detector release checkpoint", allow=(argparse.Namespace,))
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    elif isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with a 'model' state dict)")
    state = from_official(ckpt, backbone)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
