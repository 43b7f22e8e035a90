# Same prompts and data as r50-hdetr_sam-vit-b.py, with SAM ViT-L.
_base_ = ['./r50-hdetr_sam-vit-b.py']
model = dict(model_type='vit_l', sam_checkpoint='ckpt/sam_vit_l_0b3195.pth')
