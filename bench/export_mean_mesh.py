"""Write ``src/portrait3d/face/data/mean_face_468.npz`` from the shipped face rig: its mean shape on MediaPipe's
468-point mesh and the mesh's triangles (for :func:`portrait3d.face.pose.estimate_head_pose_mesh`).

    PYTHONPATH=src python bench/export_mean_mesh.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.face.pose import MEAN_MESH_PATH  # noqa: E402
from portrait3d.methods.pie.face_model import FaceModel  # noqa: E402
from portrait3d.utils.io import atomic_write  # noqa: E402


def main() -> None:
    rig = FaceModel.load("face-rig")
    v = rig.mean_shape.detach().cpu().numpy().astype(np.float32)
    f = rig.faces.detach().cpu().numpy().astype(np.int32)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, vertices=v, faces=f)

    atomic_write(MEAN_MESH_PATH, write, overwrite=True)
    print(f"wrote {MEAN_MESH_PATH}: vertices {v.shape}, faces {f.shape}")


if __name__ == "__main__":
    main()
