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


# inputs the fuzzer found (bench/fuzz_loaders.py, atheris), each once outside portrait3d's error types
REGRESSIONS = {
    # a 48-byte GIF whose header made Pillow raise struct.error
    "image": __import__("base64").b64decode("R0lGODdhAQAAAAAA//8AWwAoAAAsAAD/ADEAKAAALAAA/wAxACgAACwAAAEgGwCi"),
    # a config whose channel_base is below the resolution: a block with 0 channels divided by zero
    "config": '{"z_dim": 8, "synthesis": {"channel_base": 64, "channel_max": 8, "num_fp16_res": 4, "conv_clamp": 256, "architecture": "skip", "resample_filter": [1, 3, 3, 1], "use_noise": true, "fp16_channels_last": false, "fused_modconv_default": "inferenc"}}'.encode(),
}
# a config asking for 10^17 image channels: the allocator failed (RuntimeError) instead of the validation
HUGE_CONFIG = '{"z_dim": 8, "c_dim": 0, "w_dim": 8, "img_resolution": 4, "img_channels": 111111111111111113, "mapping": {"num_layers": 1, "embed_features": null, "layer_features": null, "activation": "lrelu", "lr_multiplier": 0.01, "w_avg_beta": 0.995}, "synthesis": {"channel_base": 64, "channel_max": 8, "num_fp16_res": 4, "conv_clamp": 256, "architecture": "skip", "resample_filter": [1, 3, 3, 1], "use_noise": true, "fp16_channels_last": false, "fused_modconv_default": ""}}'.encode()


def test_a_config_asking_for_absurd_sizes_is_refused(fuzzer):
    fuzzer.run("config", HUGE_CONFIG)


# a 52-byte pickle whose LONG_BINPUT 1349612391 made CPython size its memo to 10 GB (atheris: out of memory; 26 s)
HUGE_MEMO = __import__("base64").b64decode("gAJ9cQAoWAUAAABHX0VtYSlxAU5yZ3NxUEsCfXEDWAoAAAByZXNvbHV0aW9ucQRLCHN1Lg==")


def test_a_pickle_with_a_huge_memo_index_is_refused_before_unpickling(fuzzer):
    import time

    t0 = time.monotonic()
    fuzzer.run("pickle", HUGE_MEMO)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_inputs_the_fuzzer_found(fuzzer, name):
    fuzzer.run(name, REGRESSIONS[name])


def test_a_mangled_torch_zip_is_refused_cleanly(fuzzer):
    """The rosinality seed (a torch zip) with its first entry's metadata corrupted: torch's weights-only unpickler
    raised an AssertionError (found by the fuzzer)."""
    seed = bytearray(fuzzer.seeds["rosinality"][0])
    for at in range(30, min(len(seed), 4000), 97):
        seed[at] ^= 0x5A
        fuzzer.run("rosinality", bytes(seed))
