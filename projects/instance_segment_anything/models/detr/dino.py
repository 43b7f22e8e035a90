"""DINO (Zhang et al., ICLR 2023) inference: two-stage deformable DETR with learned content queries, look-forward-
twice box refinement and conditional query positions (``ref_point_head`` on the sine embedding of each layer's
reference boxes). Denoising queries are training-only; ``label_enc`` stays so release checkpoints load strictly.
Module names follow IDEA-Research/DINO (and the FocalNet-DINO release), apart from the backbone."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .common import (
    MLP,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    DetrBackboneMixin,
    clones,
    encoder_output_proposals,
    flatten_levels,
    inverse_sigmoid,
    sine_embed_boxes,
)


class DinoDecoder(nn.Module):
    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed = None  # shared with the detector's heads
        self.class_embed = None

    def forward(self, tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, mask):
        output = tgt
        refs = [reference_points]
        hs = []
        for lid, layer in enumerate(self.layers):
            ref_in = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_pos = self.ref_point_head(sine_embed_boxes(ref_in[:, :, 0, :]))
            output = layer(output, query_pos, ref_in, memory, spatial_shapes, level_start_index, mask)
            reference_points = (self.bbox_embed[lid](output) + inverse_sigmoid(reference_points)).sigmoid()
            refs.append(reference_points)
            hs.append(self.norm(output))
        return hs, refs


class DinoTransformer(nn.Module):
    def __init__(self, d_model=256, nhead=8, enc_layers=6, dec_layers=6, d_ffn=2048, num_levels=4, enc_points=4,
                 dec_points=4, num_queries=900, num_classes=91):
        super().__init__()
        self.encoder = DeformableEncoder(DeformableEncoderLayer(d_model, d_ffn, num_levels, nhead, enc_points),
                                         enc_layers)
        self.decoder = DinoDecoder(DeformableDecoderLayer(d_model, d_ffn, num_levels, nhead, dec_points), dec_layers,
                                   d_model)
        self.level_embed = nn.Parameter(torch.zeros(num_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_class_embed = nn.Linear(d_model, num_classes)
        self.enc_out_bbox_embed = MLP(d_model, d_model, 4, 3)
        self.num_queries = num_queries

    def forward(self, srcs, masks, pos_embeds):
        src, mask, pos, shapes, starts, ratios = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(src, shapes, starts, ratios, pos, mask)
        out_memory, proposals = encoder_output_proposals(memory, mask, shapes)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class = self.enc_out_class_embed(out_memory)
        enc_coord = self.enc_out_bbox_embed(out_memory) + proposals
        topk = torch.topk(enc_class.max(-1)[0], min(self.num_queries, enc_class.shape[1]), dim=1)[1]
        ref = torch.gather(enc_coord, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).sigmoid()
        tgt = self.tgt_embed.weight[:ref.shape[1]].unsqueeze(0).expand(src.shape[0], -1, -1)
        return self.decoder(tgt, ref, memory, shapes, starts, ratios, mask)


class DINO(DetrBackboneMixin, nn.Module):
    """Backbone (mmdet config) -> levels -> DINO transformer -> (logits (B, Q, 91), boxes cxcywh in [0, 1])."""

    def __init__(self, backbone: dict, backbone_channels: List[int], num_classes=91, num_queries=900, d_model=256,
                 nhead=8, enc_layers=6, dec_layers=6, d_ffn=2048, num_feature_levels=4, enc_points=4, dec_points=4,
                 dn_labelbook_size=91, pos_temperature=20.0):
        super().__init__()
        self._init_levels(backbone, backbone_channels, d_model, num_feature_levels, pos_temperature)
        self.transformer = DinoTransformer(d_model, nhead, enc_layers, dec_layers, d_ffn, num_feature_levels,
                                           enc_points, dec_points, num_queries, num_classes)
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, d_model)
        box_embed, class_embed = MLP(d_model, d_model, 4, 3), nn.Linear(d_model, num_classes)
        self.bbox_embed = nn.ModuleList([box_embed] * dec_layers)  # one head shared by every decoder layer
        self.class_embed = nn.ModuleList([class_embed] * dec_layers)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed

    def forward(self, img: torch.Tensor, img_metas: List[dict]):
        srcs, masks, pos = self._levels(img, img_metas)
        hs, refs = self.transformer(srcs, masks, pos)
        last = len(hs) - 1  # final boxes: the last head on the normed output, from the reference before it
        boxes = (self.bbox_embed[last](hs[last]) + inverse_sigmoid(refs[last])).sigmoid()
        return self.class_embed[last](hs[last]), boxes
