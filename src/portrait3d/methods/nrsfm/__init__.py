"""Rank-one non-rigid structure from motion for faces (Haas, Graßhof, Brandt, "Controllable GAN
Synthesis Using Non-Rigid Structure-from-Motion").

* :mod:`.model`: the shape model of eq. 2 (:class:`RankOneModel`), its parameter layout, rotations
  in the face pipeline's convention and landmark schemes.
* :mod:`.factorize`: learning the model from landmarks (eqs. 3-10) and its head-frame alignment.
* :mod:`.fit`: per-image parameters for a fixed model (eq. 11).
"""

from portrait3d.methods.nrsfm.factorize import (
    FactorizationResult,
    HeadFrameAlignment,
    RigidResult,
    align_to_head_frame,
    canonical_basis,
    center_alpha,
    factorize,
    fix_similarity_gauge,
    nonrigid_factorization,
    rigid_factorization,
)
from portrait3d.methods.nrsfm.fit import fit_params, initial_params, nearest_scaled_rotation, reprojection_error
from portrait3d.methods.nrsfm.model import (
    SCHEMES,
    LandmarkScheme,
    ParamLayout,
    RankOneModel,
    angles_from_rotation_matrix,
    get_scheme,
    join,
    rotation_matrix,
    split,
)

__all__ = [
    "SCHEMES",
    "LandmarkScheme",
    "ParamLayout",
    "RankOneModel",
    "angles_from_rotation_matrix",
    "get_scheme",
    "join",
    "rotation_matrix",
    "split",
    "RigidResult",
    "HeadFrameAlignment",
    "FactorizationResult",
    "rigid_factorization",
    "nonrigid_factorization",
    "canonical_basis",
    "center_alpha",
    "fix_similarity_gauge",
    "align_to_head_frame",
    "factorize",
    "fit_params",
    "initial_params",
    "reprojection_error",
    "nearest_scaled_rotation",
]
