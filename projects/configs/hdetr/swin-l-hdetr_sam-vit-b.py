# H-Deformable-DETR (Swin-L backbone, 900 one-to-one queries) -> SAM ViT-B.
# Checkpoint: the official release file named in `download` below, saved under the `checkpoint` path.
_base_ = ['./r50-hdetr_sam-vit-b.py']
model = dict(
    prompt=dict(
        detector=dict(
            backbone=dict(_delete_=True, type='SwinTransformer', pretrain_img_size=384, embed_dims=192,
                          depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12, mlp_ratio=4,
                          qkv_bias=True, patch_norm=True, out_indices=(1, 2, 3), convert_weights=False),
            backbone_channels=[384, 768, 1536],
            num_queries_one2one=900),
        checkpoint='ckpt/swin_l_hdetr.pth',
        ckpt_backbone='swin',
        download='H-Deformable-DETR release swin_large_hybrid_branch_lambda1_group6_t1500_n900_dp0_mqs_lft_deformable_'
                 'detr_plus_iterative_bbox_refinement_plus_plus_two_stage_36eps.pth (github.com/HDETR/H-Deformable-DETR)'))
