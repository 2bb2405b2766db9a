"""Depth-based warping for 3D GAN inversion with pose optimisation (Ko et al., WACV 2023).

Ko et al. ("Optimization using depth-based warping", main paper Sec. 3 and Algorithm 1) use the
pixel-wise depth that the NeRF renderer computes to tie the camera estimate to the image: the
input image ``x`` (seen from the estimated camera ``pi``) is warped with the rendered geometry into
a canonical view ``pi_c`` and compared with the generator's rendering from that view,

    L_warp = || M * ( W(x; D, pi -> pi_c) - G(w, pi_c) ) ||,

where ``M`` masks canonical pixels that are not visible in ``x`` (outside its frame or occluded).
If the camera is wrong, the warp fetches the wrong pixels of ``x`` and the two images disagree, so
the loss is informative about ``pi`` even when the rendered image alone is ambiguous (the latent
can partly compensate a camera error in the image loss, it cannot in the warp).

Implementation (our reading, differentiable end to end)
-------------------------------------------------------
We warp *backwards* so that ``grid_sample`` can do the resampling: every pixel of the output view
(``dst``, here ``pi_c``) is lifted to 3D with the depth rendered **from that view**
(:func:`unproject`), projected into the view the image was taken from (``src``, here ``pi``,
:func:`project`) and the image is sampled bilinearly there (:func:`warp_image`). Gradients reach the
source camera through the projection, the depth (hence the latent) through the lifting. The
occlusion test compares the distance of each lifted point to the source camera with the depth
rendered from the source view at its projection (a point farther than that by more than
``occlusion_tol`` is hidden in ``x``); pixels at depth discontinuities of either depth map are
masked too (bilinear sampling and the composited NeRF depth mix both sides of a silhouette, which
otherwise biases the minimum of the loss away from the true camera); the mask is not
differentiated.

Conventions match :class:`portrait3d.networks.eg3d.ray_sampler.RaySampler`: cameras are EG3D
labels (row-major cam2world 4x4 + normalised intrinsics 3x3, OpenCV axes, intrinsics with skew),
pixel ``(row, col)`` of an ``H x W`` map sits at normalised image coordinates
``((col + 0.5) / W, (row + 0.5) / H)``, and EG3D's ``image_depth`` is the **distance along the unit
ray** (the renderer composites the sample distances ``t`` of unit-length directions), not the
camera-space ``z``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["depth_edges", "masked_mean", "pixel_centres", "project", "split_camera", "unproject", "warp_image",
           "warp_loss"]


def split_camera(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EG3D labels ``[N, 25]`` (or ``[25]``) -> ``(cam2world [N, 4, 4], intrinsics [N, 3, 3])``."""
    if c.shape[-1] != 25:
        raise ValueError(f"camera labels must be [N, 25], got {tuple(c.shape)}")
    flat = c.reshape(-1, 25)
    return flat[:, :16].reshape(-1, 4, 4), flat[:, 16:].reshape(-1, 3, 3)


def _intrinsics_batch(intrinsics: torch.Tensor, n: int) -> torch.Tensor:
    k = intrinsics.reshape(-1, 3, 3)
    return k.expand(n, 3, 3) if k.shape[0] == 1 else k


def pixel_centres(height: int, width: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised image coordinates of the pixel centres, ``[H, W, 2]`` as ``(u, v)``.

    ``u = (col + 0.5) / W``, ``v = (row + 0.5) / H`` -- the ray positions of EG3D's ``RaySampler``.
    """
    v = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], dim=-1)


def unproject(depth: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Lift every pixel of a rendered depth map to world space (inverse of :func:`project`).

    ``X = o + D(u, v) * normalize(R K^-1 [u, v, 1]^T)``: the point at distance ``D`` along the pixel's
    EG3D ray (``K^-1`` written out with skew, as in ``RaySampler``).

    Args:
        depth: ``[N, 1, H, W]`` (or ``[N, H, W]``) ray distances, e.g. ``G.synthesis(...)['image_depth']``.
        cam2world: ``[N, 4, 4]`` rigid camera-to-world matrices.
        intrinsics: normalised ``[N, 3, 3]`` (or ``[3, 3]``).

    Returns:
        world points ``[N, H, W, 3]``, differentiable w.r.t. all inputs.
    """
    d = depth[:, 0] if depth.ndim == 4 else depth
    n, h, w = d.shape
    k = _intrinsics_batch(intrinsics, n).to(d)
    uv = pixel_centres(h, w, device=d.device, dtype=d.dtype)
    u, v = uv[..., 0][None], uv[..., 1][None]                             # [1, H, W]
    fx, fy, cx, cy, sk = (k[:, 0, 0, None, None], k[:, 1, 1, None, None], k[:, 0, 2, None, None],
                          k[:, 1, 2, None, None], k[:, 0, 1, None, None])
    x_lift = (u - cx + cy * sk / fy - sk * v / fy) / fx
    y_lift = (v - cy) / fy
    dirs_cam = torch.stack([x_lift, y_lift, torch.ones_like(x_lift)], dim=-1)  # [N, H, W, 3]
    rot, origin = cam2world[:, :3, :3].to(d), cam2world[:, :3, 3].to(d)
    dirs = F.normalize(torch.einsum("nij,nhwj->nhwi", rot, dirs_cam), dim=-1)
    return origin[:, None, None, :] + d[..., None] * dirs


def project(points: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor, return_depth: bool = False
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pinhole projection of world points into a camera.

    ``p = R^T (X - o)`` (camera coordinates, ``R`` assumed orthonormal as EG3D's are),
    ``u = fx p_x / p_z + sk p_y / p_z + cx``, ``v = fy p_y / p_z + cy``.

    Args:
        points: ``[N, ..., 3]`` world points.
        cam2world: ``[N, 4, 4]``.
        intrinsics: normalised ``[N, 3, 3]`` (or ``[3, 3]``).
        return_depth: also return the distance to the camera centre (EG3D's depth) and ``p_z``.

    Returns:
        ``uv [N, ..., 2]`` normalised image coordinates (pixel centres at ``(i + 0.5) / size``), or
        ``(uv, ray_depth [N, ...], z [N, ...])``. Points behind the camera get meaningless ``uv``:
        check ``z > 0``.
    """
    n = points.shape[0]
    shape = points.shape[1:-1]
    pts = points.reshape(n, -1, 3)
    k = _intrinsics_batch(intrinsics, n).to(pts)
    rot, origin = cam2world[:, :3, :3].to(pts), cam2world[:, :3, 3].to(pts)
    rel = pts - origin[:, None, :]
    cam = torch.einsum("nji,nmj->nmi", rot, rel)                            # R^T (X - o)
    z = cam[..., 2]
    z_safe = torch.where(z.abs() < 1e-8, torch.full_like(z, 1e-8), z)
    x, y = cam[..., 0] / z_safe, cam[..., 1] / z_safe
    u = k[:, 0, 0, None] * x + k[:, 0, 1, None] * y + k[:, 0, 2, None]
    v = k[:, 1, 1, None] * y + k[:, 1, 2, None]
    uv = torch.stack([u, v], dim=-1).reshape(n, *shape, 2)
    if not return_depth:
        return uv
    return uv, rel.norm(dim=-1).reshape(n, *shape), z.reshape(n, *shape)


def depth_edges(depth: torch.Tensor, tol: float) -> torch.Tensor:
    """``[N, 1, H, W]`` bool: pixels whose 3x3 neighbourhood spans a depth range larger than ``tol``.

    Bilinear sampling (and EG3D's composited depth) mixes the two sides of a depth discontinuity
    (silhouettes), so neither the lifted point nor the sampled colour is trustworthy there.
    """
    d = depth if depth.ndim == 4 else depth[:, None]
    hi = F.max_pool2d(d, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-d, 3, stride=1, padding=1)
    return (hi - lo) > tol


def warp_image(image: torch.Tensor, depth: torch.Tensor, src_cam: torch.Tensor, dst_cam: torch.Tensor,
               src_depth: torch.Tensor | None = None, occlusion_tol: float = 0.05, edge_aware: bool = True,
               padding_mode: str = "border") -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp ``image`` (seen from ``src_cam``) into the view ``dst_cam`` with the geometry ``depth``.

    The warp ``W(x; D, pi_src -> pi_dst)`` of Ko et al.'s depth-based warping loss: each ``dst`` pixel
    is lifted with ``depth`` (rendered from ``dst_cam``), projected into ``src_cam`` and ``image`` is
    sampled there bilinearly (``grid_sample``, ``align_corners=False``, so normalised coordinates
    map exactly onto pixel centres whatever the image's size; antialias a large image down first).

    Args:
        image: ``[N, C, Hs, Ws]`` the image taken from ``src_cam``.
        depth: ``[N, 1, H, W]`` ray distances rendered from ``dst_cam``; the output has this size.
        src_cam, dst_cam: EG3D labels ``[N, 25]`` (``[1, 25]`` broadcasts).
        src_depth: optional ``[N, 1, h, w]`` depth rendered from ``src_cam``, for the occlusion test.
        occlusion_tol: a lifted point farther from the source camera than ``src_depth`` at its
            projection by more than this (world units) counts as occluded.
        edge_aware: also mask pixels at depth discontinuities (:func:`depth_edges` with
            ``occlusion_tol``) of ``depth`` and, sampled at the projection, of ``src_depth``.
        padding_mode: ``grid_sample`` padding (out-of-frame pixels are masked anyway).

    Returns:
        ``(warped [N, C, H, W], mask [N, 1, H, W])``; ``mask`` (float 0/1, no gradient) is 1 where the
        lifted point projects inside the source frame, in front of the camera, is not occluded
        (with ``src_depth``) and not at a depth edge (``edge_aware``). ``warped`` is differentiable
        w.r.t. ``image``, ``depth`` and both cameras.
    """
    n = max(image.shape[0], depth.shape[0], src_cam.reshape(-1, 25).shape[0], dst_cam.reshape(-1, 25).shape[0])
    src_c2w, src_k = split_camera(src_cam)
    dst_c2w, dst_k = split_camera(dst_cam)
    src_c2w, src_k = src_c2w.expand(n, 4, 4), src_k.expand(n, 3, 3)
    dst_c2w, dst_k = dst_c2w.expand(n, 4, 4), dst_k.expand(n, 3, 3)
    depth = depth.expand(n, *depth.shape[1:])
    image = image.expand(n, *image.shape[1:])

    points = unproject(depth, dst_c2w, dst_k)                               # [N, H, W, 3]
    uv, dist, z = project(points, src_c2w, src_k, return_depth=True)
    grid = uv * 2.0 - 1.0
    warped = F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode=padding_mode,
                           align_corners=False)
    with torch.no_grad():
        inside = (uv >= 0).all(-1) & (uv <= 1).all(-1) & (z > 1e-6) & torch.isfinite(uv).all(-1)
        if edge_aware:
            inside &= ~depth_edges(depth.detach(), occlusion_tol)[:, 0]
        if src_depth is not None:
            sdepth = src_depth.detach().expand(n, *src_depth.shape[1:]).to(grid)
            sd = F.grid_sample(sdepth, grid.detach(), mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
            inside &= (dist - sd) <= occlusion_tol
            if edge_aware:
                edges = depth_edges(sdepth, occlusion_tol).to(grid)
                inside &= F.grid_sample(edges, grid.detach(), mode="nearest", padding_mode="border",
                                        align_corners=False)[:, 0] < 0.5
        mask = inside[:, None].to(image.dtype)
    return warped, mask


def masked_mean(error: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean of ``error [N, C, H, W]`` over the pixels where ``mask [N, 1, H, W]`` is 1 (0 if none)."""
    m = mask.expand_as(error)
    return (error * m).sum() / (m.sum() + eps)


def warp_loss(source_image: torch.Tensor, target_image: torch.Tensor, target_depth: torch.Tensor,
              source_cam: torch.Tensor, target_cam: torch.Tensor, source_depth: torch.Tensor | None = None,
              occlusion_tol: float = 0.05, norm: Literal["l1", "l2"] = "l2", edge_aware: bool = True,
              return_parts: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ko et al.'s depth-based warping loss ``|| M * (W(x; D, pi -> pi_c) - G(w, pi_c)) ||``.

    In :func:`portrait3d.methods.inversion3d.optimize.invert` ``source_image`` is the input image
    ``x`` (camera ``source_cam = pi``, the estimate being optimised), ``target_image`` / ``target_depth``
    are the generator's rendering from the canonical camera ``target_cam = pi_c``, and
    ``source_depth`` is the depth rendered from ``pi`` (occlusion mask).

    Args:
        source_image: ``[N, C, Hs, Ws]``; target_image: ``[N, C, H, W]`` at the size of ``target_depth``.
        target_depth: ``[N, 1, H, W]``; source_depth: optional ``[N, 1, h, w]``.
        source_cam, target_cam: EG3D labels ``[N, 25]``.
        occlusion_tol, edge_aware: see :func:`warp_image`.
        norm: ``"l2"`` (mean squared error) or ``"l1"`` (mean absolute error) over the masked pixels.
        return_parts: also return ``(warped, mask)``.

    Returns:
        scalar loss (0 when no pixel is valid), or ``(loss, warped, mask)``.
    """
    warped, mask = warp_image(source_image, target_depth, source_cam, target_cam, src_depth=source_depth,
                              occlusion_tol=occlusion_tol, edge_aware=edge_aware)
    if target_image.shape[-2:] != warped.shape[-2:]:
        raise ValueError(f"target_image {tuple(target_image.shape[-2:])} must match the depth size "
                         f"{tuple(warped.shape[-2:])}")
    diff = warped - target_image
    if norm == "l2":
        err = diff.square()
    elif norm == "l1":
        err = diff.abs()
    else:
        raise ValueError(f"norm must be 'l1' or 'l2', not {norm!r}")
    loss = masked_mean(err, mask)
    return (loss, warped, mask) if return_parts else loss
