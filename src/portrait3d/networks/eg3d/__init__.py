"""EG3D: tri-plane generator, camera utilities, ray sampler, volume renderer, super-resolution."""
