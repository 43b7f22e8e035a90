# Faster R-CNN R50-FPN 2x boxes -> SAM ViT-B (paper setting: COCO val2017 evaluation, train2017 calibration).
_base_ = ['../_base_/coco.py', '../../../mmdetection/configs/faster_rcnn/faster_rcnn_r50_fpn_2x_coco.py']
model = dict(
    _delete_=True,
    type='DetWrapperInstanceSAM',
    prompt=dict(type='mmdet', config='mmdetection/configs/faster_rcnn/faster_rcnn_r50_fpn_2x_coco.py',
                checkpoint='ckpt/faster_rcnn_r50_fpn_2x_coco_bbox_mAP-0.384_20200504_210434-a5d8aa15.pth',
                download='mmdetection 2.x model zoo: faster_rcnn_r50_fpn_2x_coco_bbox_mAP-0.384_20200504_210434-a5d8aa15.pth',
                score_thr=0.05, max_boxes=100),
    model_type='vit_b',
    sam_checkpoint='ckpt/sam_vit_b_01ec64.pth',
    use_sam_iou=True,
    num_classes=80,
)
data = dict(test=dict(pipeline={{_base_.test_pipeline}}), calib=dict(pipeline={{_base_.test_pipeline}}))
