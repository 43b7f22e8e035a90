# Same prompts and data as swin-t-hdetr_sam-vit-b.py, with SAM ViT-H.
_base_ = ['./swin-t-hdetr_sam-vit-b.py']
model = dict(model_type='vit_h', sam_checkpoint='ckpt/sam_vit_h_4b8939.pth')
