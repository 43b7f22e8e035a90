# YOLOX-Nano (mmdet 2.x `yolox_nano_8x8_300e_coco`), inference part only. Weights: convert the official ONNX
# export with `python tools/convert_yolox_nano_onnx.py` -> ckpt/yolox_nano_coco_from_onnx.pth.
img_scale = (416, 416)
model = dict(
    type='YOLOX',
    input_size=img_scale,
    random_size_range=(10, 20),
    random_size_interval=10,
    backbone=dict(type='CSPDarknet', deepen_factor=0.33, widen_factor=0.25, use_depthwise=True),
    neck=dict(type='YOLOXPAFPN', in_channels=[64, 128, 256], out_channels=64, num_csp_blocks=1,
              use_depthwise=True),
    bbox_head=dict(type='YOLOXHead', num_classes=80, in_channels=64, feat_channels=64, use_depthwise=True),
    train_cfg=dict(assigner=dict(type='SimOTAAssigner', center_radius=2.5)),
    test_cfg=dict(score_thr=0.01, nms=dict(type='nms', iou_threshold=0.65)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=img_scale,
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Pad', pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
            dict(type='DefaultFormatBundle'),
            dict(type='Collect', keys=['img'])
        ])
]
