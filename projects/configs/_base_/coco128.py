# The bundled coco128 sample (data/coco128, made by tools/make_coco128_split.py from ../shared/data/coco128):
# images sorted by COCO id; calibration = the first 32, evaluation = the other 96.
dataset_type = 'CocoDataset'
data_root = 'data/coco128/'
# Prompts come from the GT / a detector config inside `model`; SAM reads the original image itself,
# so this pipeline only has to produce img_metas (and the detector input for detector prompts).
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
    test=dict(type=dataset_type, ann_file=data_root + 'annotations/instances_eval96.json',
              img_prefix=data_root + 'train2017/', pipeline=meta_pipeline),
    # calibration images for quantization (first N by id of this file, see exp/*.yaml `calibrate`)
    calib=dict(type=dataset_type, ann_file=data_root + 'annotations/instances_calib32.json',
               img_prefix=data_root + 'train2017/', pipeline=meta_pipeline),
)
