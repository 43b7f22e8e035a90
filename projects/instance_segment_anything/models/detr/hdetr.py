"""H-Deformable-DETR (Jia et al., CVPR 2023) inference: two-stage Deformable DETR with iterative box refinement,
mixed query selection and the one-to-one query branch only (the hybrid one-to-many branch is training-only; its
query embeddings stay in the model so the release checkpoints load strictly). Module names follow the official
release, apart from the backbone (mmdet's ResNet / Swin, renamed by ``convert.py``)."""
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


class HDetrDecoder(nn.Module):
    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed = None  # set by the detector: shared with its heads (both names are in the checkpoint)
        self.class_embed = None

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios, query_pos, mask):
        output = tgt
        for lid, layer in enumerate(self.layers):
            ref_in = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            output = layer(output, query_pos, ref_in, src, spatial_shapes, level_start_index, mask)
            reference_points = (self.bbox_embed[lid](output) + inverse_sigmoid(reference_points)).sigmoid()
        return output, reference_points


class HDetrTransformer(nn.Module):
    def __init__(self, d_model=256, nhead=8, enc_layers=6, dec_layers=6, d_ffn=2048, num_levels=4, enc_points=4,
                 dec_points=4):
        super().__init__()
        self.d_model = d_model
        self.encoder = DeformableEncoder(DeformableEncoderLayer(d_model, d_ffn, num_levels, nhead, enc_points),
                                         enc_layers)
        self.decoder = HDetrDecoder(DeformableDecoderLayer(d_model, d_ffn, num_levels, nhead, dec_points), dec_layers)
        self.level_embed = nn.Parameter(torch.zeros(num_levels, d_model))
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
        self.pos_trans_norm = nn.LayerNorm(d_model * 2)

    def forward(self, srcs, masks, pos_embeds, query_embed, num_queries: int):
        src, mask, pos, shapes, starts, ratios = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(src, shapes, starts, ratios, pos, mask)
        out_memory, proposals = encoder_output_proposals(memory, mask, shapes)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        n = self.decoder.num_layers
        enc_class = self.decoder.class_embed[n](out_memory)
        enc_coord = self.decoder.bbox_embed[n](out_memory) + proposals
        topk = torch.topk(enc_class[..., 0], min(num_queries, enc_class.shape[1]), dim=1)[1]
        coords = torch.gather(enc_coord, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
        pos_trans = self.pos_trans_norm(self.pos_trans(sine_embed_boxes(coords.sigmoid(), xy_order=True)))
        query_pos = pos_trans[..., :self.d_model]  # mixed query selection: positions from the proposals,
        tgt = query_embed[:coords.shape[1]].unsqueeze(0).expand(src.shape[0], -1, -1)  # content from query_embed
        return self.decoder(tgt, coords.sigmoid(), memory, shapes, starts, ratios, query_pos, mask)


class HDeformableDETR(DetrBackboneMixin, nn.Module):
    """Backbone (mmdet config) -> 4 levels -> deformable transformer -> (logits (B, Q, 91), boxes cxcywh in [0,1])."""

    def __init__(self, backbone: dict, backbone_channels: List[int], num_classes=91, num_queries_one2one=300,
                 num_queries_one2many=1500, d_model=256, nhead=8, enc_layers=6, dec_layers=6, d_ffn=2048,
                 num_feature_levels=4, enc_points=4, dec_points=4):
        super().__init__()
        self._init_levels(backbone, backbone_channels, d_model, num_feature_levels, pos_temperature=10000.0)
        self.transformer = HDetrTransformer(d_model, nhead, enc_layers, dec_layers, d_ffn, num_feature_levels,
                                            enc_points, dec_points)
        self.num_queries = num_queries_one2one
        self.query_embed = nn.Embedding(num_queries_one2one + num_queries_one2many, d_model)
        num_pred = dec_layers + 1  # two-stage: one more head for the encoder proposals
        self.class_embed = clones(nn.Linear(d_model, num_classes), num_pred)
        self.bbox_embed = clones(MLP(d_model, d_model, 4, 3), num_pred)
        self.transformer.decoder.class_embed = self.class_embed
        self.transformer.decoder.bbox_embed = self.bbox_embed

    def forward(self, img: torch.Tensor, img_metas: List[dict]):
        srcs, masks, pos = self._levels(img, img_metas)
        hs, boxes = self.transformer(srcs, masks, pos, self.query_embed.weight, self.num_queries)
        return self.class_embed[self.transformer.decoder.num_layers - 1](hs), boxes
