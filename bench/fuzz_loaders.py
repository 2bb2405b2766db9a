"""Fuzz portrait3d's loaders for a bounded time (issue 18): checkpoints (our safetensors, NVIDIA pickles, rosinality
``.pt``), their JSON configs, and the image decoder path.

The targets and the invariant live in ``tests/reliability/fuzz_targets.py`` (the CI smoke run uses them too): every
input loads or raises portrait3d's error types; no other exception, no call over 10 s, and no file at the tripwire
path (a checkpoint that ran code). With atheris installed (``pip install -e .[fuzz]``) the run is coverage-guided
(libFuzzer, seeded with valid files); otherwise random byte mutations of the seeds run until the time is up (the CI smoke test uses hypothesis for the same). A violating
input is saved under ``--out`` and reported.

    PYTHONPATH=src python bench/fuzz_loaders.py --target pickle --seconds 600 --out bench_out/fuzz
    for t in safetensors pickle rosinality image config; do
        PYTHONPATH=src python bench/fuzz_loaders.py --target $t --seconds 600 --out bench_out/fuzz; done
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

import click  # noqa: E402
from tests.reliability.fuzz_targets import TARGETS, Fuzzer, Hang, mutate  # noqa: E402

MAX_LEN = 1 << 20
NVIDIA_PICKLE = REPO.parent / "shared" / "fixtures" / "parity" / "stylegan2_64.pkl"


def _with_atheris(fuzzer: Fuzzer, target: str, seconds: int, out: Path) -> dict:
    import atheris

    corpus = out / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(fuzzer.seeds[target]):
        if len(seed) <= MAX_LEN:  # libFuzzer mutates at most MAX_LEN bytes; a 16 MB seed only grew its memory
            (corpus / f"seed{i}").write_bytes(seed)
    stats = {"inputs": 0}

    def one(data: bytes) -> None:
        stats["inputs"] += 1
        try:
            fuzzer.run(target, data)
        except (AssertionError, Hang):
            (out / f"violation-{target}-{stats['inputs']}.bin").write_bytes(data)
            raise

    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=8192",
                   f"-max_len={MAX_LEN}",
                   f"-artifact_prefix={out}/"], one)
    atheris.Fuzz()  # exits the process: libFuzzer prints its own summary
    return stats


def _with_random_mutations(fuzzer: Fuzzer, target: str, seconds: int, out: Path) -> dict:
    import random

    rng = random.Random(0)
    seeds = fuzzer.seeds[target]
    stats = {"inputs": 0, "crashes": 0, "hangs": 0}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seed = rng.choice(seeds)
        flips = [(rng.randrange(1 << 20), rng.randrange(256)) for _ in range(rng.randrange(9))]
        cut = rng.randrange(len(seed) + 1) if rng.random() < 0.3 else None
        insert = (rng.randrange(1 << 20), rng.randbytes(rng.randrange(17))) if rng.random() < 0.3 else None
        data = mutate(seed, flips, cut, insert)
        stats["inputs"] += 1
        try:
            fuzzer.run(target, data)
        except Hang:
            stats["hangs"] += 1
            (out / f"hang-{target}-{stats['inputs']}.bin").write_bytes(data)
        except AssertionError as e:
            stats["crashes"] += 1
            (out / f"crash-{target}-{stats['inputs']}.bin").write_bytes(data)
            print(f"violation: {e}", flush=True)
    return stats


@click.command(context_settings={"show_default": True})
@click.option("--target", type=click.Choice(TARGETS), required=True)
@click.option("--seconds", type=click.IntRange(1), default=600)
@click.option("--engine", type=click.Choice(["auto", "atheris", "random"]), default="auto",
              help="auto: atheris when installed, else random byte mutations of the seeds.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(target: str, seconds: int, engine: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        import atheris

        # coverage feedback from the code under test only (instrumenting torch too takes minutes)
        with atheris.instrument_imports(include=["portrait3d.checkpoints", "portrait3d.face.io", "portrait3d.config",
                                                 "portrait3d.networks.stylegan2", "safetensors"]):
            import portrait3d.checkpoints.load  # noqa: F401
            import portrait3d.face.io  # noqa: F401
    out.mkdir(parents=True, exist_ok=True)
    fuzzer = Fuzzer(out / f"scratch-{target}")
    fuzzer.build_seeds(NVIDIA_PICKLE if NVIDIA_PICKLE.is_file() else None)
    t0 = time.monotonic()
    stats = (_with_atheris if engine == "atheris" else _with_random_mutations)(fuzzer, target, seconds, out)
    tripwire = fuzzer.tripwire.exists()
    print(f"{target} ({engine}): {stats['inputs']} inputs in {time.monotonic() - t0:.0f} s, "
          f"{stats.get('crashes', 0)} crashes, {stats.get('hangs', 0)} hangs, tripwire "
          f"{'FIRED' if tripwire else 'intact'}")
    if stats.get("crashes") or stats.get("hangs") or tripwire:
        sys.exit(1)


if __name__ == "__main__":
    main()
