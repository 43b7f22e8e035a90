# The bundled coco128 sample (data/coco128, made by tools/make_coco128_split.py from ../shared/data/coco128):
# images sorted by COCO id; calibration = the first 32, evaluation = the other 96.
_base_ = ['./coco.py']
data_root = 'data/coco128/'
data = dict(
    test=dict(ann_file=data_root + 'annotations/instances_eval96.json', img_prefix=data_root + 'train2017/'),
    # calibration images for quantization (first N by id of this file, see exp/*.yaml `calibrate`)
    calib=dict(ann_file=data_root + 'annotations/instances_calib32.json', img_prefix=data_root + 'train2017/'),
)
