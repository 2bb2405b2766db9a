"""LiftedGAN (Shi et al., "Lifting 2D StyleGAN for 3D-Aware Face Generation", CVPR 2021).

* :mod:`.renderer`: Unsup3d's image formation model (depth -> mesh, Lambertian shading, viewpoint,
  perspective projection) with a pure-PyTorch differentiable rasteriser, LiftedGAN's transformation
  map and mesh export.
"""

from .renderer import (
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
