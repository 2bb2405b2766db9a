"""Demographic coverage: label parsing, TV distance, ridge probes on synthetic descriptors, and the cached
labelled descriptors of real UTKFace photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.conftest import make_dataset, make_photo_dataset

from portrait3d.metrics.demographics import (
    AttributeProbe,
    LabelledDescriptors,
    coverage,
    dataset_attributes,
    parse_utkface_name,
    total_variation,
)


def test_parse_utkface_name():
    assert parse_utkface_name("100_0_0_20170112213500903.jpg.chip.jpg") == (100, 0, 0)
    assert parse_utkface_name("/data/utk/26_1_3_2017.jpg") == (26, 1, 3)
    for bad in ("0001.jpg", "26_2_0_x.jpg", "26_1_7_x.jpg", "26_1.jpg"):
        assert parse_utkface_name(bad) is None


def test_total_variation():
    assert total_variation([1, 2, 3], [2, 4, 6]) == pytest.approx(0)  # normalised first
    assert total_variation([1, 0], [0, 1]) == pytest.approx(1)
    assert total_variation([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        total_variation([1, 0], [1, 0, 0])


def _synthetic(n: int, seed: int, ethnicities: tuple[int, ...] = (0, 1, 2, 3, 4)) -> LabelledDescriptors:
    """Descriptors in which age, gender and ethnicity are linear directions plus noise."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(0, 1, (7, 128)) / np.sqrt(128)
    age = rng.uniform(1, 90, n)
    gender = rng.integers(0, 2, n)
    eth = rng.choice(ethnicities, n)
    d = (age[:, None] / 90) * basis[0] + gender[:, None] * basis[1] + np.eye(5)[eth] @ basis[2:]
    d = d + rng.normal(0, 0.02, (n, 128))
    return LabelledDescriptors(d, age.round().astype(int), gender, eth)


def test_probes_recover_linear_attributes():
    probe = AttributeProbe.fit(_synthetic(600, 0))
    acc = probe.accuracy(_synthetic(300, 1))
    assert acc["age_corr"] > 0.95 and acc["gender_acc"] > 0.95 and acc["ethnicity_acc"] > 0.95
    with pytest.raises(ValueError, match="at least 20"):
        AttributeProbe.fit(_synthetic(5, 0))


def test_coverage_sees_a_dropped_mode():
    real = _synthetic(800, 0)
    same = coverage(_synthetic(800, 1).descriptors, real)
    assert max(same["tv"].values()) < 0.08  # another draw of the same distribution
    one = coverage(_synthetic(400, 2, ethnicities=(0,)).descriptors, real)  # a generator making one ethnicity
    assert one["tv"]["ethnicity"] > 0.6 and one["tv"]["gender"] < 0.1
    assert one["test"]["ethnicity"][0] > 0.95
    assert one["probe"]["ethnicity_acc"] > 0.9  # measured on a held-out quarter of the real set
    assert sum(one["real"]["age"]) == pytest.approx(1) and sum(one["test"]["age"]) == pytest.approx(1)


def test_dataset_without_utkface_names_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", 4, 32)
    with pytest.raises(ValueError, match="no UTKFace"):
        dataset_attributes(root, 4)


def test_labelled_descriptors_of_real_photos(tmp_path, one_thread):

    root = make_photo_dataset(tmp_path / "utk", 24)
    got = dataset_attributes(root, 24)
    assert 18 <= len(got) <= 24 and got.descriptors.shape[1] == 128
    names = [row[0] for row in json.loads((root / "labels.json").read_text())["labels"]]
    want = {parse_utkface_name(name) for name in names}
    assert all((int(a), int(g), int(e)) in want for a, g, e in zip(got.ages, got.genders, got.ethnicities))
    assert (root / "attributes_n24.npz").is_file()
    again = dataset_attributes(root, 24)  # from the cache
    np.testing.assert_array_equal(again.descriptors, got.descriptors)
