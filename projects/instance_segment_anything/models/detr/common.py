"""Building blocks shared by H-Deformable-DETR and DINO (inference only), named as in the official releases so a
released checkpoint maps onto them by renaming the backbone alone.

Reused from mmcv / mmdet: the multi-scale deformable attention kernels (``ops.ms_deform_attn``: mmcv's CUDA kernel,
our CPU op or mmcv's PyTorch path) and ``SinePositionalEncoding``.
"""
from __future__ import annotations

import copy
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.utils.positional_encoding import SinePositionalEncoding
from torch import nn

from ...ops import ms_deform_attn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def cell_grid(H: int, W: int, offset: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, x) coordinates of an H x W feature map's cells, from ``offset`` in steps of 1 ("ij" meshgrid)."""
    return torch.meshgrid(torch.linspace(offset, H - 1 + offset, H, dtype=torch.float32, device=device),
                          torch.linspace(offset, W - 1 + offset, W, dtype=torch.float32, device=device), indexing="ij")


class MLP(nn.Module):
    """Feed-forward head (``layers.{i}`` Linear, ReLU between), as DETR's box head."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention (parameters ``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``, as in the official code and mmcv's ``MultiScaleDeformableAttention``)."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, impl: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.impl = d_model, n_levels, n_heads, n_points, impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, value_in, spatial_shapes, level_start_index, padding_mask=None):
        B, Q, _ = query.shape
        S = value_in.shape[1]
        value = self.value_proj(value_in)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, self.n_heads, self.d_model // self.n_heads)
        off = self.sampling_offsets(query).view(B, Q, self.n_heads, self.n_levels, self.n_points, 2)
        w = self.attention_weights(query).view(B, Q, self.n_heads, self.n_levels * self.n_points)
        w = w.softmax(-1).view(B, Q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            loc = reference_points[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2]
                   + off / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, w, impl=self.impl)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                                              padding_mask))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
        refs = []
        for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
            ry, rx = cell_grid(H, W, 0.5, device)
            ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
            rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            refs.append(torch.stack((rx, ry), -1))
        ref = torch.cat(refs, 1)
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask):
        ref = self.get_reference_points(spatial_shapes, valid_ratios, src.device)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention (nn.MultiheadAttention), deformable cross-attention, FFN; post-norm, as the official code."""

    def __init__(self, d_model=256, d_ffn=1024, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask):
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1), need_weights=False)[0]
        tgt = self.norm2(tgt + tgt2.transpose(0, 1))
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, reference_points, src, spatial_shapes,
                                               level_start_index, padding_mask))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


def flatten_levels(srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                   level_embed: torch.Tensor):
    """Flatten the feature pyramid: (B, sum HW, C) inputs, masks, pos (+ level embedding), shapes, starts, ratios."""
    src_flat, mask_flat, pos_flat, shapes = [], [], [], []
    for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
        shapes.append(src.shape[-2:])
        src_flat.append(src.flatten(2).transpose(1, 2))
        mask_flat.append(mask.flatten(1))
        pos_flat.append(pos.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1))
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=srcs[0].device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
    return (torch.cat(src_flat, 1), torch.cat(mask_flat, 1), torch.cat(pos_flat, 1), spatial_shapes,
            level_start_index, valid_ratios)


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    _, H, W = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)


def encoder_output_proposals(memory, padding_mask, spatial_shapes) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-stage proposals: one box per encoder token (centre = its cell, size 0.05 * 2^level), in logit space."""
    B = memory.shape[0]
    proposals, cur = [], 0
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        mask = padding_mask[:, cur:cur + H * W].view(B, H, W, 1)
        valid_h, valid_w = torch.sum(~mask[:, :, 0, 0], 1), torch.sum(~mask[:, 0, :, 0], 1)
        gy, gx = cell_grid(H, W, 0.0, memory.device)
        grid = torch.cat([gx.unsqueeze(-1), gy.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(B, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(B, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        cur += H * W
    props = torch.cat(proposals, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    props = props.masked_fill(padding_mask.unsqueeze(-1), float("inf")).masked_fill(~valid, float("inf"))
    out_memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return out_memory, props


def sine_embed_boxes(boxes: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0,
                     xy_order: bool = False) -> torch.Tensor:
    """Sine embedding of (N, Q, 2 or 4) boxes in [0, 1]: y, x, w, h blocks (DINO's ``gen_sineembed_for_position``),
    or x, y, w, h with ``xy_order`` (Deformable DETR's ``get_proposal_pos_embed``, which is given sigmoid(boxes))."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def emb(c):
        p = c[..., None] * scale / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), -1).flatten(-2)

    parts = [emb(boxes[..., 0]), emb(boxes[..., 1])] if xy_order else [emb(boxes[..., 1]), emb(boxes[..., 0])]
    if boxes.shape[-1] == 4:
        parts += [emb(boxes[..., 2]), emb(boxes[..., 3])]
    return torch.cat(parts, -1)


def build_input_proj(in_channels: List[int], d_model: int, num_levels: int) -> nn.ModuleList:
    """``input_proj.{i}.{0,1}``: 1x1 conv + GN per backbone level, then 3x3 stride-2 conv + GN per extra level."""
    projs = [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in in_channels]
    c = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projs.append(nn.Sequential(nn.Conv2d(c, d_model, 3, stride=2, padding=1), nn.GroupNorm(32, d_model)))
        c = d_model
    return nn.ModuleList(projs)


class LevelPositions(nn.Module):
    """Backbone outputs -> the projected levels with padding masks and sine positions (no parameters of its own)."""

    def __init__(self, d_model: int, temperature: float = 10000.0):
        super().__init__()
        self.pos = SinePositionalEncoding(d_model // 2, temperature=temperature, normalize=True, offset=-0.5)

    def forward(self, input_proj: nn.ModuleList, feats: List[torch.Tensor], pad_mask: torch.Tensor):
        srcs, masks, poss = [], [], []
        for i, proj in enumerate(input_proj):
            src = proj(feats[i]) if i < len(feats) else proj(feats[-1] if i == len(feats) else srcs[-1])
            mask = F.interpolate(pad_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            poss.append(self.pos(mask).to(src.dtype))
        return srcs, masks, poss


class DetrBackboneMixin:
    """Shared front of both detectors: ``backbone`` (mmdet config), ``input_proj`` and sine positions per level."""

    def _init_levels(self, backbone: dict, backbone_channels: List[int], d_model: int, num_levels: int,
                     pos_temperature: float) -> None:
        from mmdet.models import build_backbone  # noqa: PLC0415

        self.backbone = build_backbone(backbone)
        self.backbone_channels = list(backbone_channels)
        self.input_proj = build_input_proj(self.backbone_channels, d_model, num_levels)
        self.levels = LevelPositions(d_model, pos_temperature)

    def _levels(self, img: torch.Tensor, img_metas: List[dict]):
        check_images(img, img_metas, type(self).__name__)
        feats = list(self.backbone(img))
        if [f.shape[1] for f in feats] != self.backbone_channels:
            raise ValueError(f"{type(self).__name__}: backbone gave channels {[f.shape[1] for f in feats]}, config "
                             f"says backbone_channels={self.backbone_channels}")
        return self.levels(self.input_proj, feats, pad_mask_from_metas(img, img_metas))


def pad_mask_from_metas(img: torch.Tensor, img_metas: List[dict]) -> torch.Tensor:
    """True where the batch image is padding (outside each image's ``img_shape``)."""
    B, _, H, W = img.shape
    mask = img.new_ones((B, H, W), dtype=torch.bool)
    for i, meta in enumerate(img_metas):
        h, w = meta["img_shape"][:2]
        mask[i, :h, :w] = False
    return mask


def boxes_to_image(boxes_cxcywh: torch.Tensor, meta: dict, rescale: bool = True) -> torch.Tensor:
    """Normalised (cx, cy, w, h) on the unpadded resized image -> xyxy pixels of the original image."""
    h, w = meta["img_shape"][:2]
    cx, cy, bw, bh = boxes_cxcywh.unbind(-1)
    xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    xyxy = xyxy * xyxy.new_tensor([w, h, w, h])
    xyxy[:, 0::2].clamp_(0, w)
    xyxy[:, 1::2].clamp_(0, h)
    if rescale:
        sf = meta.get("scale_factor", 1.0)
        xyxy = xyxy / xyxy.new_tensor(sf if hasattr(sf, "__len__") else [sf] * 4)
    return xyxy


# COCO's 91-id category space (DETR label i = category id i) -> mmdet's 80 contiguous classes.
COCO80_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
              34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
              62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def coco91_to_80() -> torch.Tensor:
    """Index = DETR label (COCO category id, 0..90), value = mmdet class index 0..79, or -1 for unused ids."""
    lut = torch.full((91,), -1, dtype=torch.long)
    lut[torch.tensor(COCO80_IDS)] = torch.arange(80)
    return lut


def check_images(img: torch.Tensor, img_metas: List[dict], who: str) -> None:
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"{who}: expected a (B, 3, H, W) image batch, got {tuple(img.shape)}")
    if len(img_metas) != img.shape[0]:
        raise ValueError(f"{who}: {len(img_metas)} img_metas for a batch of {img.shape[0]}")

