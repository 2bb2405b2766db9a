"""Demographic coverage of a face generator: which ages, genders and ethnicities its samples show.

FD-dlib (:mod:`portrait3d.metrics.face_stats`) says *that* generated identities differ from real ones; this
says *how*. Linear probes on dlib's 128-D descriptors, fitted to the labels of real training photos (UTKFace
encodes ``age_gender_race`` in every file name), predict the attributes of generated faces. Both the real and
the generated sets go through the same probes, so the probes' own errors affect both alike, and the
comparison reads predicted-real against predicted-generated, never true labels against predictions.

The probes are ridge regressions (closed form, no training loop):

* age: ``a(d) = [d, 1] . beta_age``, ``beta = (X^T X + lambda I)^-1 X^T y``;
* gender: the same regression on 0 (male) / 1 (female), thresholded at 0.5;
* ethnicity: one regression per UTKFace class on its one-hot indicator, the largest score wins.

Each distribution is compared by its total-variation distance ``TV(p, q) = 1/2 sum_k |p_k - q_k|`` (0: the
same shares, 1: disjoint). Held-out probe accuracy is reported so a reader knows how far to trust the shares.
These are coarse, dataset-given categories used only to measure mode coverage, never to classify a person.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AGE_BINS", "UTKFACE_ETHNICITIES", "AttributeProbe", "LabelledDescriptors", "coverage",
           "dataset_attributes", "parse_utkface_name", "total_variation"]

UTKFACE_ETHNICITIES = ("White", "Black", "Asian", "Indian", "Others")
AGE_BINS = (0, 6, 16, 30, 45, 60, 200)  # bin edges in years: [0, 6), [6, 16), ..., [60, 200)
_NAME = re.compile(r"^(\d+)_([01])_([0-4])_")


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """``(age, gender, ethnicity)`` from a UTKFace file name ``age_gender_race_date.jpg.chip.jpg``
    (gender 0 male, 1 female; ethnicity an index into :data:`UTKFACE_ETHNICITIES`), or None if it is not one."""
    m = _NAME.match(os.path.basename(name))
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """``1/2 sum_k |p_k - q_k|`` of two discrete distributions (each normalised here)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("total_variation needs two non-empty histograms of the same shape")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xb = np.c_[x, np.ones(len(x))]
    reg = lam * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def _apply(x: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return np.c_[x, np.ones(len(x))] @ beta


@dataclass
class LabelledDescriptors:
    """dlib descriptors ``descriptors [N, 128]`` of real faces with their ``ages [N]``, ``genders [N]`` (0/1) and
    ``ethnicities [N]`` (0-4)."""

    descriptors: np.ndarray
    ages: np.ndarray
    genders: np.ndarray
    ethnicities: np.ndarray

    def __len__(self) -> int:
        return len(self.descriptors)

    def subset(self, idx: np.ndarray) -> "LabelledDescriptors":
        return LabelledDescriptors(self.descriptors[idx], self.ages[idx], self.genders[idx], self.ethnicities[idx])


@dataclass
class AttributeProbe:
    """Ridge probes from descriptors to age, gender and ethnicity (see the module docstring)."""

    age: np.ndarray          # [D + 1]
    gender: np.ndarray       # [D + 1]
    ethnicity: np.ndarray    # [D + 1, 5]

    @classmethod
    def fit(cls, data: LabelledDescriptors, lam: float = 1e-2) -> "AttributeProbe":
        if len(data) < 20:
            raise ValueError(f"fitting attribute probes needs at least 20 labelled faces, got {len(data)}")
        x = np.asarray(data.descriptors, np.float64)
        onehot = np.eye(len(UTKFACE_ETHNICITIES))[np.asarray(data.ethnicities, int)]
        return cls(_ridge(x, data.ages.astype(np.float64), lam), _ridge(x, data.genders.astype(np.float64), lam),
                   _ridge(x, onehot, lam))

    def predict(self, descriptors: np.ndarray) -> dict[str, np.ndarray]:
        """``{'age': [N] years, 'gender': [N] 0/1, 'ethnicity': [N] 0-4}`` for descriptors ``[N, D]``."""
        x = np.asarray(descriptors, np.float64)
        return {"age": _apply(x, self.age), "gender": (_apply(x, self.gender) > 0.5).astype(int),
                "ethnicity": _apply(x, self.ethnicity).argmax(1)}

    def accuracy(self, data: LabelledDescriptors) -> dict[str, float]:
        """Held-out quality: age correlation and mean absolute error (years), gender and ethnicity accuracy."""
        p = self.predict(data.descriptors)
        return {"age_corr": float(np.corrcoef(p["age"], data.ages)[0, 1]),
                "age_mae": float(np.abs(p["age"] - data.ages).mean()),
                "gender_acc": float((p["gender"] == data.genders).mean()),
                "ethnicity_acc": float((p["ethnicity"] == data.ethnicities).mean())}


def _shares(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = max(len(pred["age"]), 1)
    return {"age": np.histogram(np.clip(pred["age"], 0, AGE_BINS[-1] - 1), AGE_BINS)[0] / n,
            "gender": np.bincount(pred["gender"], minlength=2) / n,
            "ethnicity": np.bincount(pred["ethnicity"], minlength=len(UTKFACE_ETHNICITIES)) / n}


def coverage(test: np.ndarray, real: LabelledDescriptors, holdout_share: float = 0.25,
             seed: int = 0) -> dict[str, Any]:
    """Attribute shares of ``test`` descriptors ``[N, 128]`` against the real set, through probes fitted on it.

    A random ``holdout_share`` of ``real`` measures the probes' accuracy; the probes used for the shares are then
    refitted on all of it. Returns ``{'real': shares, 'test': shares, 'tv': {attribute: TV distance},
    'probe': accuracy, 'age_mean': (real, test), 'age_std': (real, test), 'n': (real, test)}``, where shares hold
    ``age`` (over :data:`AGE_BINS`), ``gender`` (male, female) and ``ethnicity`` (:data:`UTKFACE_ETHNICITIES`).
    """
    if len(test) < 1:
        raise ValueError("no test descriptors to measure")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real))
    k = int(round(len(real) * holdout_share))
    acc = AttributeProbe.fit(real.subset(order[k:])).accuracy(real.subset(order[:k])) if k >= 10 else {}
    probe = AttributeProbe.fit(real)
    pr, pt = probe.predict(real.descriptors), probe.predict(test)
    sr, st = _shares(pr), _shares(pt)
    return {"real": {a: v.tolist() for a, v in sr.items()}, "test": {a: v.tolist() for a, v in st.items()},
            "tv": {a: total_variation(sr[a], st[a]) for a in sr}, "probe": acc,
            "age_mean": (float(pr["age"].mean()), float(pt["age"].mean())),
            "age_std": (float(pr["age"].std()), float(pt["age"].std())), "n": (len(real), len(test))}


def dataset_attributes(root: str | os.PathLike[str], n: int = 1000, cache: bool = True,
                       progress: bool = False) -> LabelledDescriptors:
    """dlib descriptors (the face pipeline of :func:`~portrait3d.metrics.face_stats.measure_faces`) and UTKFace
    labels of ``n`` evenly spaced labelled images of a built dataset (``images.npy`` and ``labels.json`` with the
    photos' file names), cached as ``<root>/attributes_n<N>.npz``.

    Raises ValueError when the dataset's file names carry no UTKFace labels.
    """
    from portrait3d.metrics.face_stats import measure_faces, read_npz_cache, write_npz_cache

    root = Path(root)
    names = [row[0] for row in json.loads((root / "labels.json").read_text())["labels"]]
    parsed = [parse_utkface_name(s) for s in names]
    labelled = np.array([i for i, p in enumerate(parsed) if p is not None])
    if len(labelled) < 20:
        raise ValueError(f"{root}: the file names carry no UTKFace age/gender/ethnicity labels")
    count = min(int(n), len(labelled))
    path = root / f"attributes_n{count}.npz"
    d = read_npz_cache(path, count) if cache else None
    if d is not None:
        return LabelledDescriptors(d["descriptors"], d["ages"], d["genders"], d["ethnicities"])
    images = np.load(root / "images.npy", mmap_mode="r")
    pick = labelled[np.linspace(0, len(labelled) - 1, count).round().astype(int)]
    stats = measure_faces((np.asarray(images[i]) for i in pick), total=count, progress=progress)
    lab = np.asarray([parsed[pick[k]] for k in stats.index], np.int64).reshape(-1, 3)
    out = LabelledDescriptors(stats.descriptors, lab[:, 0], lab[:, 1], lab[:, 2])
    if cache:
        write_npz_cache(path, count, {"descriptors": out.descriptors, "ages": out.ages, "genders": out.genders,
                                      "ethnicities": out.ethnicities}, "attribute descriptors")
    return out
