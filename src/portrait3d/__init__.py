"""portrait3d: 3D-aware portrait synthesis, GAN inversion and editing in pure PyTorch.

Top-level entry points::

    import portrait3d
    G = portrait3d.load_network("ffhq512-128.pkl")        # NVIDIA pickle, rosinality .pt or ours
    c = portrait3d.camera_from_angles(yaw_deg=20, pitch_deg=0)   # EG3D 25-d camera
"""

from portrait3d.checkpoints import CheckpointError, load_network, save_network
from portrait3d.networks.eg3d.camera import angles_from_camera, camera_from_angles

__version__ = "0.1.0"

__all__ = ["load_network", "save_network", "camera_from_angles", "angles_from_camera", "CheckpointError",
           "__version__"]
