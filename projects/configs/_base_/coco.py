# The paper's setting: evaluation on COCO val2017, calibration on train2017, under data/coco/
# (data/coco/annotations/instances_{val,train}2017.json, data/coco/{val,train}2017/).
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
meta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        scale_factor=1.0,
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img'],
                 meta_keys=('filename', 'ori_filename', 'ori_shape', 'img_shape', 'pad_shape', 'scale_factor')),
        ])
]
data = dict(
    samples_per_gpu=1,
    workers_per_gpu=0,
    test=dict(type=dataset_type, ann_file=data_root + 'annotations/instances_val2017.json',
              img_prefix=data_root + 'val2017/', pipeline=meta_pipeline),
    calib=dict(type=dataset_type, ann_file=data_root + 'annotations/instances_train2017.json',
               img_prefix=data_root + 'train2017/', pipeline=meta_pipeline),
)
