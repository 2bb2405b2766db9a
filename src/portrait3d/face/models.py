"""Locate the offline model files shipped by pip packages (never downloaded at run time).

* dlib models come from the ``face_recognition_models`` wheel. Importing that package fails on
  recent Python (it needs ``pkg_resources``), so we find its folder with ``importlib.util.find_spec``.
* mediapipe 0.10.21's wheel carries its ``.tflite`` / ``.binarypb`` models and the canonical face
  geometry under ``mediapipe/modules``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterator

__all__ = ["DLIB_MODELS", "dlib_model_path", "mediapipe_root", "quiet_native_stderr", "ReleasesOnExit"]

DLIB_MODELS = {
    "shape_68": "shape_predictor_68_face_landmarks.dat",
    "shape_5": "shape_predictor_5_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}


@functools.lru_cache(maxsize=None)
def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise RuntimeError(f"the '{name}' package is not installed (run scripts/setup.sh)")
    return Path(spec.origin).resolve().parent


def dlib_model_path(key: str) -> Path:
    """Path of a dlib model file: ``key`` in :data:`DLIB_MODELS` (e.g. ``'shape_68'``)."""
    path = _package_dir("face_recognition_models") / "models" / DLIB_MODELS[key]
    if not path.exists():
        raise RuntimeError(f"dlib model file missing: {path}")
    return path


def mediapipe_root() -> Path:
    """The installed ``mediapipe`` package folder (its bundled models live under ``modules/``)."""
    return _package_dir("mediapipe")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence C++-level stderr (MediaPipe/TFLite print INFO and absl warnings there on every graph
    start, and no environment variable turns them off). Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. under some test runners): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ReleasesOnExit:
    """Mixin for objects holding native graphs: ``with obj:`` and garbage collection call ``close()``."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the subclass instance
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort during interpreter exit
        try:
            self.close()
        except Exception:
            pass
