"""Fuzzing smoke run (issue 18): each loader gets byte-mutated versions of valid files for a few seconds in CI; the
long runs are ``bench/fuzz_loaders.py``. The invariant (:mod:`tests.reliability.fuzz_targets`): load, or raise one
of portrait3d's error types; no other exception, no hang, no code run from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.reliability.fuzz_targets import TARGETS, Fuzzer, mutate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = {"safetensors": 600, "pickle": 600, "rosinality": 300, "image": 1000, "config": 600}
NVIDIA_PICKLE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "parity" / "stylegan2_64.pkl"


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    f = Fuzzer(tmp_path_factory.mktemp("fuzz"))
    f.build_seeds(NVIDIA_PICKLE if NVIDIA_PICKLE.is_file() else None)
    return f


def test_seeds_are_valid_or_refused_cleanly(fuzzer):
    for name in TARGETS:
        for seed in fuzzer.seeds[name]:
            fuzzer.run(name, seed)  # the tripwire seed is refused; the others load


@pytest.mark.parametrize("name", TARGETS)
def test_mutated_inputs_keep_the_invariant(fuzzer, name):
    n_seeds = len(fuzzer.seeds[name])

    @settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, n_seeds - 1),
           flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
           cut=st.none() | st.integers(0, 1 << 20),
           insert=st.none() | st.tuples(st.integers(0, 1 << 20), st.binary(max_size=16)))
    def check(seed, flips, cut, insert):
        fuzzer.run(name, mutate(fuzzer.seeds[name][seed], flips, cut, insert))

    check()
