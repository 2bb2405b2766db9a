"""Generator networks in pure PyTorch: StyleGAN2 (:mod:`.stylegan2`) and EG3D (:mod:`.eg3d`)."""
