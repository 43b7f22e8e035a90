# H-Deformable-DETR (Swin-T backbone, 300 one-to-one queries) -> SAM ViT-B.
# Checkpoint: the official release file named in `download` below, saved under the `checkpoint` path.
_base_ = ['./r50-hdetr_sam-vit-b.py']
model = dict(
    prompt=dict(
        detector=dict(
            backbone=dict(_delete_=True, type='SwinTransformer', pretrain_img_size=224, embed_dims=96,
                          depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True,
                          patch_norm=True, out_indices=(1, 2, 3), convert_weights=False),
            backbone_channels=[192, 384, 768]),
        checkpoint='ckpt/swin_t_hdetr.pth',
        ckpt_backbone='swin',
        download='H-Deformable-DETR release swin_tiny_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_'
                 'plus_iterative_bbox_refinement_plus_plus_two_stage_36eps.pth (github.com/HDETR/H-Deformable-DETR)'))
