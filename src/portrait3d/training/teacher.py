"""Teacher sets: samples of a trained 2D generator with the latent, camera and face mesh of each.

    portrait3d train teacher-set --network default-2d --out ~/.cache/portrait3d/teacher-2d --count 8000

An EG3D run can be *distilled* from such a set (``portrait3d train eg3d --distill DIR``): for a teacher
sample ``x = G2(z)`` seen from the camera ``c`` that the face pipeline measures on it, the tri-plane generator
started from the same 2D weights (:func:`portrait3d.training.eg3d.init_from_2d`) is asked to render ``x`` from
``c`` given the same ``z``, and its depth at the face mesh's points to follow the mesh's relative depth. The
targets are supervised, so they pull the generator toward faces much faster than an adversarial signal (the
argument of NeRF-GAN distillation and LP3D, which also train 3D generators from a 2D GAN's samples); the mesh
depth keeps that from becoming a billboard turned toward each sample's camera.

A set is a built :class:`~portrait3d.face.dataset.AlignedFaceDataset` (``images.npy``, ``labels.json``: the
camera of each sample, estimated as for photos: dlib's 68 points, :func:`~portrait3d.face.pose.estimate_head_pose`
with EG3D's field of view) plus ``latents.npy`` (``float32 [N, z_dim]``) and ``mesh.npy`` (``float32 [N, 468, 3]``:
MediaPipe's face mesh in image pixels, ``z`` in the same pixel units, smaller = nearer the camera). Samples in
which MediaPipe finds no face are left out, so the set holds only faces the face pipeline accepts.

**Turned views** (:func:`add_teacher_views`): one view per latent says little about depth (the generator's heads
turn through a yaw std of about 9 degrees). A 2D generator can turn a head itself, roughly: its ``w`` moves along
the direction in which yaw varies over the set (the regression of ``w`` on the measured yaw, ``Cov(w, yaw) /
Var(yaw)``), at some cost in identity. Each latent then also gets the renders of ``w + k d`` for the requested
turns ``k`` (degrees along that direction), each with the camera and mesh measured on it, stored in
``view_images.npy`` ``[N, V, R, R, 3]``, ``view_cameras.npy`` ``[N, V, 25]`` and ``view_mesh.npy``
``[N, V, 468, 3]``: the same latent seen from several measured cameras. A latent whose turned views hold no face
keeps view 0 in their place (its camera then repeats).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["MESH_POINTS", "TeacherSet", "add_teacher_views", "build_teacher_set", "yaw_direction"]

MESH_POINTS = 468
WORK_SIZE = 256  # the face tools see the samples upscaled to this (BlazeFace and dlib want more than 128 px)


@dataclass
class TeacherSet:
    """A loaded teacher set: ``images uint8 [N, R, R, 3]``, ``cameras [N, 25]``, ``latents [N, z_dim]``,
    ``mesh [N, 468, 3]`` (pixels of the ``R x R`` image)."""

    images: np.ndarray
    cameras: torch.Tensor
    latents: torch.Tensor
    mesh: torch.Tensor
    network: str
    view_images: np.ndarray | None = None   # [N, V, R, R, 3] turned views, or None
    view_cameras: torch.Tensor | None = None
    view_mesh: torch.Tensor | None = None

    @property
    def num_views(self) -> int:
        """Views per latent: 1 plus the turned views."""
        return 1 + (0 if self.view_images is None else self.view_images.shape[1])

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> TeacherSet:
        r = Path(root)
        names = ("images.npy", "labels.json", "latents.npy", "mesh.npy")
        missing = [n for n in names if not (r / n).exists()]
        if missing:
            raise UsageError(f"{root} is not a teacher set (missing {', '.join(missing)}; build one with "
                             f"'portrait3d train teacher-set')")
        meta = json.loads((r / "labels.json").read_text())
        images = np.load(r / "images.npy", mmap_mode="r")
        latents = torch.from_numpy(np.load(r / "latents.npy").astype(np.float32))
        mesh = torch.from_numpy(np.load(r / "mesh.npy").astype(np.float32))
        cams = torch.tensor([c for _, c in meta["labels"]], dtype=torch.float32)
        n = len(cams)
        if not (len(images) == len(latents) == len(mesh) == n) or mesh.shape[1:] != (MESH_POINTS, 3):
            raise UsageError(f"{root}: images, labels, latents and mesh disagree in length or shape")
        views: dict[str, Any] = {}
        if (r / "view_cameras.npy").exists():  # written last
            views = {"view_images": np.load(r / "view_images.npy", mmap_mode="r"),
                     "view_cameras": torch.from_numpy(np.load(r / "view_cameras.npy").astype(np.float32)),
                     "view_mesh": torch.from_numpy(np.load(r / "view_mesh.npy").astype(np.float32))}
            if not (len(views["view_images"]) == len(views["view_cameras"]) == len(views["view_mesh"]) == n):
                raise UsageError(f"{root}: the turned views disagree in length with the set")
        return cls(images, cams, latents, mesh, str(meta.get("summary", {}).get("network", "?")), **views)

    def __len__(self) -> int:
        return len(self.cameras)

    def batch(self, idx: torch.Tensor, view: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images float [B, 3, R, R] in [-1, 1], cameras [B, 25], latents [B, z_dim], mesh [B, 468, 3])`` of
        latents ``idx``, seen in ``view`` (``[B]``: 0 the sample itself, ``v > 0`` its turned view ``v``)."""
        i = idx.cpu().numpy()
        v = np.zeros_like(i) if view is None else view.cpu().numpy()
        if v.max(initial=0) >= self.num_views:
            raise UsageError(f"view {int(v.max())} asked of a set with {self.num_views} views per latent")
        img = torch.from_numpy(np.stack([np.asarray(self.images[k]) if w == 0 else
                                         np.asarray(self.view_images[k, w - 1]) for k, w in zip(i, v)]))
        cams, mesh = self.cameras[idx].clone(), self.mesh[idx].clone()
        turned = torch.from_numpy(v > 0)
        if turned.any():
            cams[turned] = self.view_cameras[idx[turned], torch.from_numpy(v[v > 0] - 1)]
            mesh[turned] = self.view_mesh[idx[turned], torch.from_numpy(v[v > 0] - 1)]
        return img.permute(0, 3, 1, 2).float() / 127.5 - 1, cams, self.latents[idx], mesh


def _camera_and_mesh(fa: Any, image: np.ndarray) -> tuple[torch.Tensor, np.ndarray] | None:
    """The EG3D camera ``[25]`` of one ``uint8 [R, R, 3]`` sample, measured as for photos (dlib's 68 points, PnP
    with EG3D's field of view), and its face mesh ``float32 [468, 3]`` in the sample's pixels; None without a face.
    ``fa``: a :class:`~portrait3d.face.analyzer.FaceAnalyzer` (it upscales the sample for the face tools)."""
    from portrait3d.face.pipeline import EG3D_FOV_DEG
    from portrait3d.face.pose import camera_from_pose, estimate_head_pose

    found = fa.landmarks_and_mesh(image)
    if found is None:
        return None
    try:
        pose = estimate_head_pose(found[0], (image.shape[1], image.shape[0]), fov_deg=EG3D_FOV_DEG)
    except ValueError:
        return None
    return camera_from_pose(pose), found[1].astype(np.float32)


def build_teacher_set(G: torch.nn.Module, out: str | os.PathLike[str], count: int, seed: int = 0, batch: int = 16,
                      truncation_psi: float = 1.0, network_name: str = "?", progress: bool = True,
                      max_samples: int | None = None) -> dict[str, Any]:
    """Sample ``G`` (a 2D StyleGAN2, constant noise) until ``count`` samples have a face, and write the set.

    Latents come from ``torch.Generator().manual_seed(seed)``, so the set is reproducible. Returns the summary
    (also stored in ``labels.json``). ``out`` must not already hold a set. Gives up with a
    :class:`~portrait3d.errors.UsageError` once ``max_samples`` (default ``4 * count + 64``) samples held too few
    faces: such a generator cannot teach faces.
    """
    from tqdm import tqdm

    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.utils.io import write_json, write_npy
    from portrait3d.utils.visualize import to_uint8

    if count < 1:
        raise UsageError("count must be at least 1")
    root = Path(out)
    if (root / "labels.json").exists():
        raise UsageError(f"{root} already holds a teacher set")
    root.mkdir(parents=True, exist_ok=True)
    dev = next(G.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    images, latents, meshes, labels = [], [], [], []
    tried = 0
    limit = max_samples if max_samples is not None else 4 * count + 64
    bar = tqdm(total=count, desc="teacher set", unit="face", disable=not progress)
    with FaceAnalyzer("mediapipe", WORK_SIZE) as fa:
        while len(images) < count:
            if tried >= limit:
                raise UsageError(f"only {len(images)} of {tried} samples of {network_name} hold a face the face "
                                 f"pipeline finds; this generator cannot teach faces")
            z = torch.randn(batch, G.z_dim, generator=gen)
            with torch.no_grad():
                img = to_uint8(G(z.to(dev), torch.zeros(batch, G.c_dim, device=dev), truncation_psi=truncation_psi,
                                 noise_mode="const"))
            for zi, im in zip(z, img):
                tried += 1
                found = _camera_and_mesh(fa, im)
                if found is None:
                    continue
                images.append(im)
                latents.append(zi.numpy())
                meshes.append(found[1])
                labels.append([f"sample-{tried - 1:07d}", [float(v) for v in found[0].tolist()]])
                bar.update(1)
                if len(images) == count:
                    break
    bar.close()
    summary = {"network": network_name, "count": len(images), "sampled": tried, "seed": int(seed),
               "truncation_psi": float(truncation_psi), "resolution": int(images[0].shape[0]),
               "face_rate": len(images) / tried}
    write_npy(root / "images.npy", np.stack(images), overwrite=True)
    write_npy(root / "latents.npy", np.stack(latents).astype(np.float32), overwrite=True)
    write_npy(root / "mesh.npy", np.stack(meshes), overwrite=True)
    write_json(root / "labels.json", {"labels": labels, "summary": summary}, overwrite=True)  # last: marks it done
    return summary


def yaw_direction(w: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """``Cov(w, yaw) / Var(yaw)``, ``[D]``: how ``w`` moves per degree of yaw over a set of samples (the
    direction in which the generator's own heads turn, in its data's units)."""
    w = w.double() - w.double().mean(0)
    y = yaw.double() - yaw.double().mean()
    return (w.T @ y / (y @ y)).float()


def add_teacher_views(G: torch.nn.Module, root: str | os.PathLike[str], turns: tuple[float, ...] = (-25.0, 25.0),
                      batch: int = 16, progress: bool = True) -> dict[str, Any]:
    """Give every latent of the teacher set at ``root`` turned views (see the module docstring) and write them.

    ``turns``: offsets along :func:`yaw_direction` in its nominal degrees (the measured turn is smaller: the
    direction is fitted to how yaw varies over the set, not to the generator's geometry). Returns a summary with
    the measured yaw change of each view and how many latents kept view 0 in place of a faceless turned view.
    """
    from tqdm import tqdm

    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.face.pose import pose_from_camera
    from portrait3d.utils.io import write_json, write_npy
    from portrait3d.utils.visualize import to_uint8

    r = Path(root)
    t = TeacherSet.load(r)
    if t.view_images is not None:
        raise UsageError(f"{root} already has turned views")
    if not turns:
        raise UsageError("give at least one turn")
    dev = next(G.parameters()).device
    with torch.no_grad():
        w = torch.cat([G.mapping(z.to(dev), torch.zeros(len(z), G.c_dim, device=dev))[:, 0].cpu()
                       for z in t.latents.split(1000)])
    yaw0 = torch.as_tensor(pose_from_camera(t.cameras)[0])
    d = yaw_direction(w, yaw0)
    n, res = len(t), t.images.shape[1]
    imgs = np.empty((n, len(turns), res, res, 3), np.uint8)
    cams = torch.empty(n, len(turns), 25)
    mesh = torch.empty(n, len(turns), MESH_POINTS, 3)
    missing = 0
    with FaceAnalyzer("mediapipe", WORK_SIZE) as fa:
        for s in tqdm(range(0, n, batch), desc="turned views", unit="batch", disable=not progress):
            wb = w[s:s + batch]
            for j, k in enumerate(turns):
                ws = (wb + k * d).to(dev)[:, None].expand(-1, G.num_ws, -1)
                with torch.no_grad():
                    out = to_uint8(G.synthesis(ws, noise_mode="const"))
                for i, im in enumerate(out):
                    row = s + i
                    found = _camera_and_mesh(fa, im)
                    if found is None:  # keep view 0 in its place
                        missing += 1
                        imgs[row, j], cams[row, j], mesh[row, j] = t.images[row], t.cameras[row], t.mesh[row]
                        continue
                    imgs[row, j] = im
                    cams[row, j] = found[0]
                    mesh[row, j] = torch.from_numpy(found[1])
    yaw_v = torch.as_tensor(pose_from_camera(cams.reshape(-1, 25))[0]).reshape(n, len(turns))
    change = (yaw_v - yaw0[:, None]).median(0).values
    summary = {"turns": list(turns), "measured_yaw_change_median": [float(c) for c in change],
               "views_without_face": missing, "direction_norm_per_degree": float(d.norm())}
    write_npy(r / "view_images.npy", imgs, overwrite=True)
    write_npy(r / "view_mesh.npy", mesh.numpy(), overwrite=True)
    write_npy(r / "view_cameras.npy", cams.numpy(), overwrite=True)  # last: a set with it has all three
    meta = json.loads((r / "labels.json").read_text())
    meta.setdefault("summary", {})["views"] = summary
    write_json(r / "labels.json", meta, overwrite=True)
    return summary
