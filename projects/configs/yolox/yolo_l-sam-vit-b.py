# YOLOX-L boxes -> SAM ViT-B (paper setting: COCO val2017 evaluation, train2017 calibration, data/coco/).
_base_ = ['../_base_/coco.py', '../../../mmdetection/configs/yolox/yolox_l_8x8_300e_coco.py']
model = dict(
    _delete_=True,
    type='DetWrapperInstanceSAM',
    prompt=dict(type='mmdet', config='mmdetection/configs/yolox/yolox_l_8x8_300e_coco.py',
                checkpoint='ckpt/yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth',
                download='mmdetection 2.x model zoo: yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth',
                score_thr=0.05, max_boxes=100),
    model_type='vit_b',
    sam_checkpoint='ckpt/sam_vit_b_01ec64.pth',
    use_sam_iou=True,
    num_classes=80,
)
data = dict(test=dict(pipeline={{_base_.test_pipeline}}), calib=dict(pipeline={{_base_.test_pipeline}}))
