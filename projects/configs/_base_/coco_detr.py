# COCO (paper setting) with the DETR-family test pipeline: shorter side 800, longer <= 1333, ImageNet mean/std in RGB.
_base_ = ['./coco.py']
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1333, 800),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=1),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img'],
                 meta_keys=('filename', 'ori_filename', 'ori_shape', 'img_shape', 'pad_shape', 'scale_factor',
                            'flip', 'flip_direction', 'img_norm_cfg')),
        ])
]
data = dict(test=dict(pipeline=test_pipeline), calib=dict(pipeline=test_pipeline))
