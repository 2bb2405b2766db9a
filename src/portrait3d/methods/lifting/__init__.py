"""LiftedGAN (Shi et al., "Lifting 2D StyleGAN for 3D-Aware Face Generation", CVPR 2021).

* :mod:`portrait3d.geometry.render` (shared with PIE's face rig): Unsup3d's image formation model (depth ->
  mesh, Lambertian shading, viewpoint, perspective projection) with a pure-PyTorch differentiable rasteriser,
  LiftedGAN's transformation map and mesh export.
* :mod:`.networks`: the 3D generator of Sec. 3.1 (D_V, D_L, M, D_S, D_T around the frozen G2D).
* :mod:`.losses`: Sec. 3.2, eqs. 2-9, and the ablation table.
* :mod:`.train`: the resumable distillation loop and its command line.
* :mod:`.evaluate`: Table 2 (FID, depth and pose error, ablations) and Figure 7 (identity vs yaw).
"""

from portrait3d.geometry.render import (
    RendererConfig,
    RenderOutput,
    depth_to_points,
    faces_for_grid,
    light_direction,
    mesh_from_depth,
    normals_from_depth,
    project_points,
    rasterize,
    render,
    rotation_from_view,
    save_obj,
    shade,
    transform_points,
    zero_border,
)

__all__ = ["RendererConfig", "RenderOutput", "depth_to_points", "faces_for_grid", "light_direction",
           "mesh_from_depth", "normals_from_depth", "project_points", "rasterize", "render",
           "rotation_from_view", "save_obj", "shade", "transform_points", "zero_border"]
