"""3D GAN inversion with pose optimisation (Ko et al., "3D GAN Inversion with Pose Optimization", WACV 2023).

* :mod:`.networks`: the latent encoder E, the pose estimator P, rotation helpers, their file format.
* :mod:`.pseudo`: generator pseudo pairs ``(w, camera, image)`` for pre-training E and P.
* :mod:`.train`: pre-training of E and P (``python -m portrait3d.methods.inversion3d.train``); import its
  names from the module itself (importing it here would make ``python -m`` warn that the module was
  imported twice).
"""

from portrait3d.methods.inversion3d.networks import (
    BackboneOutput,
    EncoderConfig,
    LatentEncoder,
    PoseConfig,
    PoseEstimator,
    PoseOutput,
    ResNetBackbone,
    angles_from_rotation,
    camera_from_pose,
    generator_w_avg,
    load_module,
    matrix_to_rotation_6d,
    rotation_6d_to_matrix,
    rotation_from_angles,
    save_module,
)
from portrait3d.methods.inversion3d.pseudo import PseudoPairConfig, PseudoPairStream, sample_poses, sample_pseudo_pairs
