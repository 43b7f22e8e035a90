# Embedded default with a real detector: YOLOX-Nano (converted from ../shared/models/yolox_nano/yolox_nano.onnx by
# tools/convert_yolox_nano_onnx.py) -> LiteMedSAM, on the bundled coco128 evaluation split.
_base_ = ['../_base_/coco128.py', '../../../mmdetection/configs/yolox/yolox_nano_8x8_300e_coco.py']
model = dict(
    _delete_=True,
    type='DetWrapperInstanceSAM',
    prompt=dict(type='mmdet', config='mmdetection/configs/yolox/yolox_nano_8x8_300e_coco.py',
                checkpoint='ckpt/yolox_nano_coco_from_onnx.pth',
                download='run `python tools/convert_yolox_nano_onnx.py` (converts ../shared/models/yolox_nano)',
                score_thr=0.05, max_boxes=100),
    model_type='lite_medsam',
    sam_checkpoint=None,
    use_sam_iou=True,
    num_classes=80,
)
data = dict(test=dict(pipeline={{_base_.test_pipeline}}), calib=dict(pipeline={{_base_.test_pipeline}}))
