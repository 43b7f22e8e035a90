# DINO with a FocalNet-L backbone (focal level 4, Objects365 pre-trained, COCO fine-tuned; 900 queries, top 300
# boxes, no NMS) -> SAM ViT-B. Checkpoint: focalnet_large_fl4_o365_finetuned_on_coco.pth (github.com/microsoft/FocalNet,
# DINO release) saved as ckpt/focalnet_l_dino.pth.
_base_ = ['../_base_/coco_detr.py']
model = dict(
    type='DetWrapperInstanceSAM',
    prompt=dict(
        type='detr',
        detector=dict(
            type='DINO',
            backbone=dict(type='FocalNet', embed_dim=192, depths=[2, 2, 18, 2], out_indices=(0, 1, 2, 3),
                          focal_levels=[4, 4, 4, 4], focal_windows=[3, 3, 3, 3], use_conv_embed=True,
                          use_layerscale=True, use_postln=True, use_postln_in_modulation=False,
                          normalize_modulator=False),
            backbone_channels=[192, 384, 768, 1536],
            num_classes=91, num_queries=900, d_ffn=2048, num_feature_levels=5, dn_labelbook_size=91),
        checkpoint='ckpt/focalnet_l_dino.pth',
        ckpt_backbone='focalnet',
        download='focalnet_large_fl4_o365_finetuned_on_coco.pth (github.com/microsoft/FocalNet, DINO release)',
        topk=300, score_thr=0.0, max_boxes=300),
    model_type='vit_b',
    sam_checkpoint='ckpt/sam_vit_b_01ec64.pth',
    use_sam_iou=True,
    num_classes=80,
    box_batch=64,
)
