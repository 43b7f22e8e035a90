# H-Deformable-DETR (R50, two-stage, iterative box refinement, 300 one-to-one queries, 36 epochs) -> SAM ViT-B.
# Checkpoint: the official release file named in `download` below, saved under the `checkpoint` path.
_base_ = ['../_base_/coco_detr.py']
model = dict(
    type='DetWrapperInstanceSAM',
    prompt=dict(
        type='detr',
        detector=dict(
            type='HDeformableDETR',
            backbone=dict(type='ResNet', depth=50, num_stages=4, out_indices=(1, 2, 3), frozen_stages=-1,
                          norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True, style='pytorch'),
            backbone_channels=[512, 1024, 2048],
            num_classes=91, num_queries_one2one=300, num_queries_one2many=1500, d_ffn=2048, num_feature_levels=4),
        checkpoint='ckpt/r50_hdetr.pth',
        ckpt_backbone='resnet',
        download='H-Deformable-DETR release r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_'
                 'iterative_bbox_refinement_plus_plus_two_stage_36eps.pth (github.com/HDETR/H-Deformable-DETR)',
        topk=100, score_thr=0.0, max_boxes=100),
    model_type='vit_b',
    sam_checkpoint='ckpt/sam_vit_b_01ec64.pth',
    use_sam_iou=True,
    num_classes=80,
)
