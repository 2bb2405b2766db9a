"""3D GAN inversion with pose optimisation (Ko et al., "3D GAN Inversion with Pose Optimization", WACV 2023).

* :mod:`.networks`: the latent encoder E, the pose estimator P, rotation helpers, their file format.
* :mod:`.pseudo`: generator pseudo pairs ``(w, camera, image)`` for pre-training E and P.
* :mod:`.train`: pre-training of E and P (``portrait3d train encoder|pose``); import its
  names from the module itself (importing it here would make ``python -m`` warn that the module was
  imported twice).
* :mod:`.camera_params`: the differentiable camera (angles + learnable translation) being optimised.
* :mod:`.warp`: depth reprojection and the warp loss.
* :mod:`.pti`: pivotal tuning with the depth-smoothness regulariser.
* :mod:`.optimize`: Algorithm 1 (alternating latent / camera steps) and the baselines, Algorithms 2-3.
"""

from portrait3d.methods.inversion3d.camera_params import CameraParams
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
from portrait3d.methods.inversion3d.optimize import ImageLoss, InversionConfig, InversionResult, LossWeights, invert
from portrait3d.methods.inversion3d.pseudo import PseudoPairConfig, PseudoPairStream, sample_poses, sample_pseudo_pairs
from portrait3d.methods.inversion3d.pti import PTIConfig, depth_smoothness, pivotal_tuning
from portrait3d.methods.inversion3d.warp import warp_image, warp_loss
