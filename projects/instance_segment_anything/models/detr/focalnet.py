"""FocalNet (Yang et al., NeurIPS 2022) backbone for detection, registered in mmdet's BACKBONES as ``FocalNet``.

Module names follow microsoft/FocalNet's detection backbone (``patch_embed.proj``, ``layers.{i}.blocks.{j}.
modulation.{f,h,proj,focal_layers}``, ``gamma_1``/``gamma_2``, ``layers.{i}.downsample``, ``norm{i}``), so the
FocalNet-DINO release maps onto it by stripping the ``backbone.0.`` prefix.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from mmdet.models.builder import BACKBONES
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FocalModulation(nn.Module):
    def __init__(self, dim: int, focal_window: int, focal_level: int, focal_factor: int = 2,
                 use_postln_in_modulation: bool = False, normalize_modulator: bool = False):
        super().__init__()
        self.dim, self.focal_level, self.normalize_modulator = dim, focal_level, normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + (focal_level + 1), bias=True)
        self.h = nn.Conv2d(dim, dim, kernel_size=1, stride=1, padding=0, groups=1, bias=True)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            ks = focal_factor * k + focal_window
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=ks, stride=1, groups=dim, padding=ks // 2, bias=False), nn.GELU()))
        self.use_postln_in_modulation = use_postln_in_modulation
        if use_postln_in_modulation:
            self.ln = nn.LayerNorm(dim)

    def forward(self, x):  # (B, H, W, C)
        C = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2)
        q, ctx, gates = torch.split(x, (C, C, self.focal_level + 1), 1)
        ctx_all = 0
        for level in range(self.focal_level):
            ctx = self.focal_layers[level](ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        x_out = (q * self.h(ctx_all)).permute(0, 2, 3, 1)
        if self.use_postln_in_modulation:
            x_out = self.ln(x_out)
        return self.proj(x_out)


class FocalNetBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0, focal_level=2, focal_window=9, use_layerscale=False,
                 layerscale_value=1e-4, use_postln=False, use_postln_in_modulation=False, normalize_modulator=False):
        super().__init__()
        self.use_postln = use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_window, focal_level, 2, use_postln_in_modulation,
                                          normalize_modulator)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1, self.gamma_2 = 1.0, 1.0
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))

    def forward(self, x, H, W):
        B, L, C = x.shape
        shortcut = x
        if not self.use_postln:
            x = self.norm1(x)
        x = self.modulation(x.view(B, H, W, C)).view(B, H * W, C)
        if self.use_postln:
            x = self.norm1(x)
        x = shortcut + self.gamma_1 * x
        if self.use_postln:
            return x + self.gamma_2 * self.norm2(self.mlp(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim, use_conv_embed=False, is_stem=False, norm=True):
        super().__init__()
        self.patch_size = patch_size
        if use_conv_embed:
            kernel, padding, stride = (7, 2, 4) if is_stem else (3, 1, 2)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x):
        _, _, H, W = x.shape
        if W % self.patch_size:
            x = F.pad(x, (0, self.patch_size - W % self.patch_size))
        if H % self.patch_size:
            x = F.pad(x, (0, 0, 0, self.patch_size - H % self.patch_size))
        x = self.proj(x)
        Wh, Ww = x.shape[2:]
        if self.norm is not None:
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, x.shape[1], Wh, Ww)
        return x


class BasicLayer(nn.Module):
    def __init__(self, dim, out_dim, depth, mlp_ratio, downsample, focal_level, focal_window, use_conv_embed,
                 use_layerscale, use_postln, use_postln_in_modulation, normalize_modulator):
        super().__init__()
        self.blocks = nn.ModuleList([
            FocalNetBlock(dim, mlp_ratio, focal_level, focal_window, use_layerscale, 1e-4, use_postln,
                          use_postln_in_modulation, normalize_modulator) for _ in range(depth)])
        self.downsample = (PatchEmbed(2, dim, out_dim, use_conv_embed, is_stem=False) if downsample else None)

    def forward(self, x, H, W):
        for blk in self.blocks:
            x = blk(x, H, W)
        if self.downsample is None:
            return x, H, W, x, H, W
        x_down = self.downsample(x.transpose(1, 2).reshape(x.shape[0], -1, H, W))
        Wh, Ww = x_down.shape[2:]
        return x, H, W, x_down.flatten(2).transpose(1, 2), Wh, Ww


@BACKBONES.register_module()
class FocalNet(nn.Module):
    """FocalNet detection backbone; returns the maps of ``out_indices`` (B, C_i, H_i, W_i), each after ``norm{i}``."""

    def __init__(self, embed_dim=96, depths: Sequence[int] = (2, 2, 6, 2), mlp_ratio=4.0, patch_size=4,
                 out_indices: Sequence[int] = (1, 2, 3), focal_levels: Sequence[int] = (2, 2, 2, 2),
                 focal_windows: Sequence[int] = (9, 9, 9, 9), use_conv_embed=False, use_layerscale=False,
                 use_postln=False, use_postln_in_modulation=False, normalize_modulator=False, init_cfg=None):
        super().__init__()
        self.num_layers = len(depths)
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim, use_conv_embed, is_stem=True)
        dims = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.num_features = dims
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(BasicLayer(
                dims[i], dims[i + 1] if i < self.num_layers - 1 else None, depths[i], mlp_ratio,
                i < self.num_layers - 1, focal_levels[i], focal_windows[i], use_conv_embed, use_layerscale,
                use_postln, use_postln_in_modulation, normalize_modulator))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))

    def forward(self, x):
        x = self.patch_embed(x)
        Wh, Ww = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, H, W, x, Wh, Ww = layer(x, Wh, Ww)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(x_out)
                outs.append(out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)
