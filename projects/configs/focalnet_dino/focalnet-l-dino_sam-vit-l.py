# Same prompts and data as focalnet-l-dino_sam-vit-b.py, with SAM ViT-L.
_base_ = ['./focalnet-l-dino_sam-vit-b.py']
model = dict(model_type='vit_l', sam_checkpoint='ckpt/sam_vit_l_0b3195.pth')
