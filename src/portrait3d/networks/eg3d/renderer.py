"""EG3D tri-plane volume renderer (pure PyTorch reimplementation).

Mirrors ``training/volumetric_rendering/{renderer.py, ray_marcher.py, math_utils.py}`` of
NVlabs/eg3d with the same float32 operation order, plus the dense density-grid sampling used by
``gen_samples.py`` for shape extraction. The only addition is a ``deterministic`` switch that
replaces the two random draws of the official sampler (stratified jitter and importance ``u``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from portrait3d.networks.ops import RandomSource, draw_rand, draw_randn

__all__ = [
    "generate_planes",
    "project_onto_planes",
    "sample_from_planes",
    "get_ray_limits_box",
    "linspace",
    "MipRayMarcher2",
    "ImportanceRenderer",
    "create_samples",
    "sample_density_grid",
]

Options = Dict[str, Any]
Decoder = Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------- tri-plane sampling


def generate_planes() -> torch.Tensor:
    """Axes of the three feature planes, exactly as in official EG3D.

    Each ``[3, 3]`` entry lists the plane's axes as rows; a point ``p`` is sampled at the first two
    components of ``p @ inv(axes)``. Plane 0 uses ``(x, y)``, plane 1 ``(x, z)`` and plane 2, by a
    known quirk of the official code (NVlabs/eg3d issue #67), ``(z, x)`` rather than the intended
    ``(z, y)`` / ``(y, z)``: the y-z plane is never used. Pretrained checkpoints were trained with
    this quirk, so it is kept.

    Returns:
        float32 ``[3, 3, 3]``.
    """
    return torch.tensor(
        [
            [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
            [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
        ],
        dtype=torch.float32,
    )


def project_onto_planes(planes: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Project 3D points onto each plane.

    Args:
        planes: plane axes ``[P, 3, 3]``.
        coordinates: points ``[N, M, 3]``.

    Returns:
        2D plane coordinates ``[N * P, M, 2]`` (batch-major: index ``n * P + p``).
    """
    n, m, _ = coordinates.shape
    n_planes = planes.shape[0]
    coordinates = coordinates.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(n * n_planes, m, 3)
    inv_planes = torch.linalg.inv(planes).unsqueeze(0).expand(n, -1, -1, -1).reshape(n * n_planes, 3, 3)
    projections = torch.bmm(coordinates, inv_planes)
    return projections[..., :2]


def sample_from_planes(
    plane_axes: torch.Tensor,
    plane_features: torch.Tensor,
    coordinates: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    box_warp: Optional[float] = None,
) -> torch.Tensor:
    """Bilinearly sample tri-plane features at 3D points.

    Points are scaled by ``2 / box_warp`` so the cube ``[-box_warp/2, box_warp/2]^3`` maps onto the
    planes' ``[-1, 1]`` extent (``grid_sample`` with ``align_corners=False``; outside -> zeros).
    See :func:`generate_planes` for the plane-axis quirk.

    Args:
        plane_axes: ``[P, 3, 3]``.
        plane_features: ``[N, P, C, H, W]``.
        coordinates: ``[N, M, 3]`` world points.
        mode: ``grid_sample`` interpolation mode.
        padding_mode: must be ``'zeros'`` (as official).
        box_warp: side length of the feature cube.

    Returns:
        features ``[N, P, M, C]``.
    """
    assert padding_mode == "zeros"
    n, n_planes, c, h, w = plane_features.shape
    _, m, _ = coordinates.shape
    plane_features = plane_features.view(n * n_planes, c, h, w)

    coordinates = (2 / box_warp) * coordinates

    projected = project_onto_planes(plane_axes, coordinates).unsqueeze(1)  # [N*P, 1, M, 2]
    out = F.grid_sample(
        plane_features, projected.float(), mode=mode, padding_mode=padding_mode, align_corners=False
    )  # [N*P, C, 1, M]
    return out.permute(0, 3, 2, 1).reshape(n, n_planes, m, c)


# ----------------------------------------------------------------------------- math utils


def get_ray_limits_box(
    rays_o: torch.Tensor, rays_d: torch.Tensor, box_side_length: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ray / axis-aligned cube intersection (slab method), as official ``math_utils``.

    The cube is centred at the origin with side ``box_side_length``. Inputs are detached.

    Args:
        rays_o: ray origins ``[..., 3]``.
        rays_d: ray directions ``[..., 3]``.
        box_side_length: cube side.

    Returns:
        ``(t_min [..., 1], t_max [..., 1])``; rays that miss get ``t_min = -1, t_max = -2``.
    """
    o_shape = rays_o.shape
    rays_o = rays_o.detach().reshape(-1, 3)
    rays_d = rays_d.detach().reshape(-1, 3)

    half = box_side_length / 2
    bounds = torch.tensor(
        [[-1 * half, -1 * half, -1 * half], [1 * half, 1 * half, 1 * half]],
        dtype=rays_o.dtype,
        device=rays_o.device,
    )
    is_valid = torch.ones(rays_o.shape[:-1], dtype=torch.bool, device=rays_o.device)

    invdir = 1 / rays_d
    sign = (invdir < 0).long()

    def slab(axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
        lo = (bounds.index_select(0, sign[..., axis])[..., axis] - rays_o[..., axis]) * invdir[..., axis]
        hi = (bounds.index_select(0, 1 - sign[..., axis])[..., axis] - rays_o[..., axis]) * invdir[..., axis]
        return lo, hi

    tmin, tmax = slab(0)
    tymin, tymax = slab(1)
    is_valid[torch.logical_or(tmin > tymax, tymin > tmax)] = False
    tmin = torch.max(tmin, tymin)
    tmax = torch.min(tmax, tymax)

    tzmin, tzmax = slab(2)
    is_valid[torch.logical_or(tmin > tzmax, tzmin > tmax)] = False
    tmin = torch.max(tmin, tzmin)
    tmax = torch.min(tmax, tzmax)

    tmin[torch.logical_not(is_valid)] = -1
    tmax[torch.logical_not(is_valid)] = -2
    return tmin.reshape(*o_shape[:-1], 1), tmax.reshape(*o_shape[:-1], 1)


def linspace(start: torch.Tensor, stop: torch.Tensor, num: int) -> torch.Tensor:
    """Multi-dimensional ``linspace`` (official ``math_utils.linspace``).

    Args:
        start: ``[*S]``.
        stop: ``[*S]``.
        num: number of steps (inclusive of both ends).

    Returns:
        ``[num, *S]`` with ``out[i] = start + (i / (num - 1)) * (stop - start)``.
    """
    steps = torch.arange(num, dtype=torch.float32, device=start.device) / (num - 1)
    steps = steps.reshape([-1] + [1] * start.ndim)
    return start[None] + steps * (stop - start)[None]


# ----------------------------------------------------------------------------- ray marcher


class MipRayMarcher2(torch.nn.Module):
    """Volume-rendering quadrature of EG3D (MipNeRF-style, midpoint rule).

    Colours, raw densities and depths are averaged between consecutive samples; the density is
    activated as ``softplus(sigma - 1)``; ``alpha = 1 - exp(-sigma * delta)``;
    ``w_i = alpha_i * prod_{j<i}(1 - alpha_j + 1e-10)``. Output colours are mapped to ``[-1, 1]``.
    """

    def forward(
        self,
        colors: torch.Tensor,
        densities: torch.Tensor,
        depths: torch.Tensor,
        rendering_options: Options,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Composite samples along rays.

        Args:
            colors: ``[N, M, S, C]`` (sorted by depth).
            densities: raw densities ``[N, M, S, 1]``.
            depths: ``[N, M, S, 1]``.
            rendering_options: uses ``clamp_mode`` (must be ``'softplus'``) and optional
                ``white_back``.

        Returns:
            ``(rgb [N, M, C] in [-1, 1], depth [N, M, 1], weights [N, M, S-1, 1])``. The depth is the
            weight-normalized mean, NaN -> inf, then clamped to the global min/max of ``depths``.
        """
        deltas = depths[:, :, 1:] - depths[:, :, :-1]
        colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
        densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
        depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2

        if rendering_options["clamp_mode"] != "softplus":
            raise ValueError("MipRayMarcher2 only supports clamp_mode='softplus'")
        densities_mid = F.softplus(densities_mid - 1)  # -1 bias: official init trick

        density_delta = densities_mid * deltas
        alpha = 1 - torch.exp(-density_delta)

        alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
        weights = alpha * torch.cumprod(alpha_shifted, -2)[:, :, :-1]

        composite_rgb = torch.sum(weights * colors_mid, -2)
        weight_total = weights.sum(2)
        composite_depth = torch.sum(weights * depths_mid, -2) / weight_total

        composite_depth = torch.nan_to_num(composite_depth, float("inf"))
        composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))

        if rendering_options.get("white_back", False):
            composite_rgb = composite_rgb + 1 - weight_total

        composite_rgb = composite_rgb * 2 - 1
        return composite_rgb, composite_depth, weights


# ----------------------------------------------------------------------------- renderer


class ImportanceRenderer(torch.nn.Module):
    """EG3D two-pass (stratified + importance) tri-plane volume renderer.

    ``plane_axes`` is a non-persistent buffer (the official attribute is not in the state dict
    either), so it follows ``.to(device)`` without adding state-dict keys.

    ``rendering_options`` keys used: ``ray_start``, ``ray_end`` (floats, or both ``'auto'`` for the
    ray/box intersection), ``depth_resolution``, ``depth_resolution_importance``,
    ``disparity_space_sampling``, ``box_warp``, ``clamp_mode``, optional ``white_back`` and
    ``density_noise``.
    """

    plane_axes: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.ray_marcher = MipRayMarcher2()
        self.register_buffer("plane_axes", generate_planes(), persistent=False)

    def forward(
        self,
        planes: torch.Tensor,
        decoder: Decoder,
        ray_origins: torch.Tensor,
        ray_directions: torch.Tensor,
        rendering_options: Options,
        deterministic: bool = False,
        random: RandomSource | None = None,
        with_spread: bool = False,
    ) -> Tuple[torch.Tensor, ...]:
        """Render rays through a tri-plane.

        Args:
            planes: tri-plane features ``[N, 3, C, H, W]``.
            decoder: callable ``(features [N, 3, K, C], directions [N, K, 3]) ->
                {'rgb': [N, K, F], 'sigma': [N, K, 1]}`` (e.g. :class:`OSGDecoder`).
            ray_origins: ``[N, M, 3]``.
            ray_directions: ``[N, M, 3]`` unit vectors.
            rendering_options: see class docstring.
            deterministic: if True, stratified depths sit at the middle of each bin (the official
                ``torch.rand_like`` jitter replaced by 0.5) and importance sampling uses the
                official ``det=True`` branch. ``density_noise`` (if > 0) stays random.
            random: where the jitter, importance samples and density noise are drawn from (global RNG if None).
            with_spread: also return the depth spread of each ray, ``sqrt(sum_i w_i (t_i - d)^2 / sum_i w_i)``
                over the final samples (near 0 where the ray stops at a surface, large in fog).

        Returns:
            ``(features [N, M, F] in [-1, 1], depth [N, M, 1], weight_total [N, M, 1])``, and
            ``spread [N, M, 1]`` with ``with_spread``.
        """
        if rendering_options["ray_start"] == rendering_options["ray_end"] == "auto":
            ray_start, ray_end = get_ray_limits_box(
                ray_origins, ray_directions, box_side_length=rendering_options["box_warp"]
            )
            is_ray_valid = ray_end > ray_start
            if torch.any(is_ray_valid).item():
                # Official: rays missing the box borrow the valid range; ray_end uses the max of
                # *ray_start* (upstream quirk, kept for parity).
                ray_start[~is_ray_valid] = ray_start[is_ray_valid].min()
                ray_end[~is_ray_valid] = ray_start[is_ray_valid].max()
            depths_coarse = self.sample_stratified(
                ray_origins,
                ray_start,
                ray_end,
                rendering_options["depth_resolution"],
                rendering_options["disparity_space_sampling"],
                deterministic=deterministic,
                random=random,
            )
        else:
            depths_coarse = self.sample_stratified(
                ray_origins,
                rendering_options["ray_start"],
                rendering_options["ray_end"],
                rendering_options["depth_resolution"],
                rendering_options["disparity_space_sampling"],
                deterministic=deterministic,
                random=random,
            )

        batch_size, num_rays, samples_per_ray, _ = depths_coarse.shape

        # Coarse pass
        colors_coarse, densities_coarse = self._query(
            planes, decoder, ray_origins, ray_directions, depths_coarse, rendering_options, random
        )

        # Fine pass
        n_importance = rendering_options["depth_resolution_importance"]
        if n_importance > 0:
            _, _, weights = self.ray_marcher(colors_coarse, densities_coarse, depths_coarse, rendering_options)
            depths_fine = self.sample_importance(depths_coarse, weights, n_importance, det=deterministic,
                                                 random=random)
            colors_fine, densities_fine = self._query(
                planes, decoder, ray_origins, ray_directions, depths_fine, rendering_options, random
            )
            all_depths, all_colors, all_densities = self.unify_samples(
                depths_coarse, colors_coarse, densities_coarse, depths_fine, colors_fine, densities_fine
            )
            rgb_final, depth_final, weights = self.ray_marcher(
                all_colors, all_densities, all_depths, rendering_options
            )
        else:
            all_depths = depths_coarse
            rgb_final, depth_final, weights = self.ray_marcher(
                colors_coarse, densities_coarse, depths_coarse, rendering_options
            )
        total = weights.sum(2)
        if not with_spread:
            return rgb_final, depth_final, total
        mids = (all_depths[:, :, 1:] + all_depths[:, :, :-1]) / 2
        var = (weights * (mids - depth_final[:, :, None]).square()).sum(2) / total.clamp_min(1e-6)
        return rgb_final, depth_final, total, var.clamp_min(1e-10).sqrt()

    def _query(
        self,
        planes: torch.Tensor,
        decoder: Decoder,
        ray_origins: torch.Tensor,
        ray_directions: torch.Tensor,
        depths: torch.Tensor,
        options: Options,
        random: RandomSource | None = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode colours ``[N, M, S, F]`` and raw densities ``[N, M, S, 1]`` at ``depths [N, M, S, 1]``."""
        batch_size, num_rays, samples_per_ray, _ = depths.shape
        sample_coordinates = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(
            batch_size, -1, 3
        )
        sample_directions = (
            ray_directions.unsqueeze(-2).expand(-1, -1, samples_per_ray, -1).reshape(batch_size, -1, 3)
        )
        out = self.run_model(planes, decoder, sample_coordinates, sample_directions, options, random)
        colors = out["rgb"].reshape(batch_size, num_rays, samples_per_ray, out["rgb"].shape[-1])
        densities = out["sigma"].reshape(batch_size, num_rays, samples_per_ray, 1)
        return colors, densities

    def run_model(
        self,
        planes: torch.Tensor,
        decoder: Decoder,
        sample_coordinates: torch.Tensor,
        sample_directions: torch.Tensor,
        options: Options,
        random: RandomSource | None = None,
    ) -> Dict[str, torch.Tensor]:
        """Sample the tri-plane and decode.

        Args:
            planes: ``[N, 3, C, H, W]``.
            decoder: see :meth:`forward`.
            sample_coordinates: ``[N, K, 3]``.
            sample_directions: ``[N, K, 3]``.
            options: uses ``box_warp`` and optional ``density_noise``.

        Returns:
            decoder output dict with ``'rgb' [N, K, F]`` and raw ``'sigma' [N, K, 1]``.
        """
        sampled_features = sample_from_planes(
            self.plane_axes.to(planes.device),
            planes,
            sample_coordinates,
            padding_mode="zeros",
            box_warp=options["box_warp"],
        )
        out = decoder(sampled_features, sample_directions)
        if options.get("density_noise", 0) > 0:
            sigma = out["sigma"]
            out["sigma"] = sigma + draw_randn(random, sigma.shape, sigma.device, sigma.dtype) * options["density_noise"]
        return out

    @staticmethod
    def sort_samples(
        all_depths: torch.Tensor, all_colors: torch.Tensor, all_densities: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sort samples ``[N, M, S, *]`` by depth along dim -2."""
        _, indices = torch.sort(all_depths, dim=-2)
        all_depths = torch.gather(all_depths, -2, indices)
        all_colors = torch.gather(all_colors, -2, indices.expand(-1, -1, -1, all_colors.shape[-1]))
        all_densities = torch.gather(all_densities, -2, indices.expand(-1, -1, -1, 1))
        return all_depths, all_colors, all_densities

    def unify_samples(
        self,
        depths1: torch.Tensor,
        colors1: torch.Tensor,
        densities1: torch.Tensor,
        depths2: torch.Tensor,
        colors2: torch.Tensor,
        densities2: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenate two sample sets ``[N, M, S1, *]``, ``[N, M, S2, *]`` and sort by depth."""
        all_depths = torch.cat([depths1, depths2], dim=-2)
        all_colors = torch.cat([colors1, colors2], dim=-2)
        all_densities = torch.cat([densities1, densities2], dim=-2)
        return self.sort_samples(all_depths, all_colors, all_densities)

    def sample_stratified(
        self,
        ray_origins: torch.Tensor,
        ray_start: Union[float, torch.Tensor],
        ray_end: Union[float, torch.Tensor],
        depth_resolution: int,
        disparity_space_sampling: bool = False,
        deterministic: bool = False,
        random: RandomSource | None = None,
    ) -> torch.Tensor:
        """Stratified depths: ``linspace(start, end, D) + U * delta`` with ``delta = (end-start)/(D-1)``.

        With ``deterministic`` ``U = 0.5`` (middle of each bin) instead of ``U ~ Uniform[0, 1)``.
        Note, as official, the last sample lies beyond ``ray_end`` by ``U * delta``.

        Args:
            ray_origins: ``[N, M, 3]`` (only the shape/device are used).
            ray_start: float, or ``[N, M, 1]`` tensor (``'auto'`` mode).
            ray_end: float, or ``[N, M, 1]`` tensor.
            depth_resolution: ``D``.
            disparity_space_sampling: sample linearly in inverse depth instead.
            deterministic: see above.

        Returns:
            depths ``[N, M, D, 1]``.
        """
        n, m, _ = ray_origins.shape

        def jitter(x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, 0.5) if deterministic else draw_rand(random, x.shape, x.device, x.dtype)

        if disparity_space_sampling:
            depths = (
                torch.linspace(0, 1, depth_resolution, device=ray_origins.device)
                .reshape(1, 1, depth_resolution, 1)
                .repeat(n, m, 1, 1)
            )
            depth_delta = 1 / (depth_resolution - 1)
            depths += jitter(depths) * depth_delta
            if isinstance(ray_start, torch.Tensor):
                # Official code would broadcast [N,M,1] against [N,M,D,1] incorrectly here; insert the
                # sample axis so 'auto' + disparity sampling works (no effect on float limits).
                ray_start, ray_end = ray_start.unsqueeze(-2), ray_end.unsqueeze(-2)
            depths = 1.0 / (1.0 / ray_start * (1.0 - depths) + 1.0 / ray_end * depths)
        elif isinstance(ray_start, torch.Tensor):
            depths = linspace(ray_start, ray_end, depth_resolution).permute(1, 2, 0, 3)
            depth_delta = (ray_end - ray_start) / (depth_resolution - 1)
            depths += jitter(depths) * depth_delta[..., None]
        else:
            depths = (
                torch.linspace(ray_start, ray_end, depth_resolution, device=ray_origins.device)
                .reshape(1, 1, depth_resolution, 1)
                .repeat(n, m, 1, 1)
            )
            depth_delta = (ray_end - ray_start) / (depth_resolution - 1)
            depths += jitter(depths) * depth_delta
        return depths

    def sample_importance(
        self, z_vals: torch.Tensor, weights: torch.Tensor, n_importance: int, det: bool = False,
        random: RandomSource | None = None,
    ) -> torch.Tensor:
        """NeRF importance sampling from smoothed coarse weights (no gradient).

        Weights are smoothed by a 2-tap max-pool then 2-tap average-pool, offset by 0.01, and
        sampled over the coarse bin midpoints (as official).

        Args:
            z_vals: coarse depths ``[N, M, S, 1]``.
            weights: coarse weights ``[N, M, S-1, 1]`` from :class:`MipRayMarcher2`.
            n_importance: samples per ray.
            det: use evenly spaced ``u`` (official ``det=True``).

        Returns:
            fine depths ``[N, M, n_importance, 1]`` (detached).
        """
        with torch.no_grad():
            batch_size, num_rays, samples_per_ray, _ = z_vals.shape
            z_vals = z_vals.reshape(batch_size * num_rays, samples_per_ray)
            weights = weights.reshape(batch_size * num_rays, -1)

            weights = F.max_pool1d(weights.unsqueeze(1).float(), 2, 1, padding=1)
            # squeeze(1) rather than the official squeeze(): same values, but safe for a single ray.
            weights = F.avg_pool1d(weights, 2, 1).squeeze(1)
            weights = weights + 0.01

            z_vals_mid = 0.5 * (z_vals[:, :-1] + z_vals[:, 1:])
            importance_z_vals = self.sample_pdf(z_vals_mid, weights[:, 1:-1], n_importance, det=det, random=random)
            return importance_z_vals.detach().reshape(batch_size, num_rays, n_importance, 1)

    @staticmethod
    def sample_pdf(
        bins: torch.Tensor, weights: torch.Tensor, n_importance: int, det: bool = False, eps: float = 1e-5,
        random: RandomSource | None = None,
    ) -> torch.Tensor:
        """Inverse-CDF sampling of a piecewise-constant pdf.

        Args:
            bins: bin edges ``[R, B]`` with ``B >= K + 1`` (EG3D passes ``B = K + 2``; as official
                only the first ``K + 1`` edges are used).
            weights: unnormalized bin weights ``[R, K]``.
            n_importance: samples per row.
            det: ``u = linspace(0, 1, n_importance)`` instead of ``u ~ Uniform[0, 1)``.
            eps: added to the weights; also the threshold for degenerate CDF steps.

        Returns:
            samples ``[R, n_importance]``.
        """
        n_rays, n_samples = weights.shape
        weights = weights + eps
        pdf = weights / torch.sum(weights, -1, keepdim=True)
        cdf = torch.cumsum(pdf, -1)
        cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)  # [R, K + 1]

        if det:
            u = torch.linspace(0, 1, n_importance, device=bins.device).expand(n_rays, n_importance)
        else:
            u = draw_rand(random, (n_rays, n_importance), bins.device)
        u = u.contiguous()

        inds = torch.searchsorted(cdf, u, right=True)
        below = torch.clamp_min(inds - 1, 0)
        above = torch.clamp_max(inds, n_samples)

        inds_sampled = torch.stack([below, above], -1).view(n_rays, 2 * n_importance)
        cdf_g = torch.gather(cdf, 1, inds_sampled).view(n_rays, n_importance, 2)
        bins_g = torch.gather(bins, 1, inds_sampled).view(n_rays, n_importance, 2)

        denom = cdf_g[..., 1] - cdf_g[..., 0]
        denom[denom < eps] = 1  # zero-weight bin: never sampled, any value works
        return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


# ----------------------------------------------------------------------------- shape extraction


def create_samples(
    N: int = 256, voxel_origin: Sequence[float] = (0, 0, 0), cube_length: float = 2.0
) -> Tuple[torch.Tensor, np.ndarray, float]:
    """Dense sample grid of EG3D's ``gen_samples.create_samples`` (bit-identical).

    Sample ``i = a*N^2 + b*N + c`` gets ``[a', b', c] * voxel_size + corner`` where, faithfully to the
    official code, the index arithmetic is done with float division: ``b' = (i / N) % N = b + c/N``
    and ``a' = (i / N / N) % N = a + (b + c/N)/N`` (a small within-voxel shear of the grid, plus
    float32 rounding of ``i`` for ``N^3 > 2^24``). Column 0 uses ``corner[2]`` and column 2
    ``corner[0]`` as official (equal for a symmetric origin).

    Args:
        N: samples per side.
        voxel_origin: cube centre (the returned origin is the min corner).
        cube_length: cube side (EG3D uses ``box_warp``).

    Returns:
        ``(samples [1, N^3, 3], corner np.ndarray [3] = voxel_origin - cube_length/2,
        voxel_size = cube_length / (N - 1))``. Column 2 varies fastest.
    """
    corner = np.array(voxel_origin) - cube_length / 2
    voxel_size = cube_length / (N - 1)

    overall_index = torch.arange(0, N**3, 1, dtype=torch.long)
    samples = torch.zeros(N**3, 3)
    samples[:, 2] = overall_index % N
    samples[:, 1] = (overall_index.float() / N) % N
    samples[:, 0] = ((overall_index.float() / N) / N) % N

    samples[:, 0] = (samples[:, 0] * voxel_size) + corner[2]
    samples[:, 1] = (samples[:, 1] * voxel_size) + corner[1]
    samples[:, 2] = (samples[:, 2] * voxel_size) + corner[0]
    return samples.unsqueeze(0), corner, voxel_size


def sample_density_grid(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    resolution: int = 256,
    cube_length: float = 1.0,
    voxel_origin: Sequence[float] = (0, 0, 0),
    max_batch: int = 1_000_000,
    device: Optional[Union[str, torch.device]] = None,
) -> Tuple[torch.Tensor, np.ndarray, float]:
    """Evaluate raw densities on the ``gen_samples.py`` shape-extraction grid, in chunks.

    Uses :func:`create_samples` (with its official quirks) and calls ``decode_fn`` on chunks of at
    most ``max_batch`` points under ``torch.no_grad()``. For a generator, ``decode_fn`` would wrap
    ``ImportanceRenderer.run_model`` with directions ``(0, 0, -1)`` and return ``out['sigma']``.
    The official script then flips axis 0 (``np.flip(sigmas, 0)``), sets a border of
    ``int(30 * N / 256)`` voxels to -1000 and runs marching cubes at level 10; those steps are
    left to the caller.

    Args:
        decode_fn: ``coords [1, K, 3] -> sigma [1, K, 1]`` (raw density).
        resolution: grid side ``N``.
        cube_length: grid extent (EG3D: ``rendering_kwargs['box_warp']``).
        voxel_origin: grid centre.
        max_batch: points per ``decode_fn`` call.
        device: device for the coordinates (default CPU).

    Returns:
        ``(sigmas [N, N, N], corner [3], voxel_size)``; ``sigmas[a, b, c]`` is the sample with flat
        index ``a*N^2 + b*N + c`` (column 0 of the coordinates varies slowest).
    """
    samples, corner, voxel_size = create_samples(resolution, voxel_origin, cube_length)
    if device is not None:
        samples = samples.to(device)
    sigmas = torch.zeros((samples.shape[0], samples.shape[1], 1), device=samples.device)
    head = 0
    with torch.no_grad():
        while head < samples.shape[1]:
            sigma = decode_fn(samples[:, head : head + max_batch])
            sigmas[:, head : head + max_batch] = sigma.to(sigmas)
            head += max_batch
    return sigmas.reshape(resolution, resolution, resolution), corner, voxel_size
