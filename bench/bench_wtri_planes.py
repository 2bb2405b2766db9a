"""W_tri's last backbone block, run per plane: three calls, or one call on a 3N batch (one grouped modulated
convolution over (sample, plane) pairs). Measures both in one run, forward alone and forward + backward (what
encoder training pays), on the shipped generator, and prints seconds and the ratio (issue 16, item 1).

    PYTHONPATH=src python bench/bench_wtri_planes.py --threads 2 --batch 4 --repeats 10
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.checkpoints import load_network  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # the median: robust to a busy neighbour


@click.command(context_settings={"show_default": True})
@click.option("--network", default="default-3d")
@click.option("--threads", type=click.IntRange(1), default=2)
@click.option("--batch", type=click.IntRange(1), default=4)
@click.option("--repeats", type=click.IntRange(1), default=10)
@click.option("--bf16/--fp32", default=True, help="Autocast to bfloat16 (the fast CPU path).")
def main(network: str, threads: int, batch: int, repeats: int, bf16: bool) -> None:
    torch.set_num_threads(threads)
    G = load_network(network).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ws = G.mapping(torch.randn(batch, G.z_dim, generator=g), torch.zeros(batch, G.c_dim))
    base = G.wtri_from_ws(ws)
    planes = base.planes + 0.1 * torch.randn(base.planes.shape, generator=g)  # distinct per-plane codes
    code = type(base)(base.shared, planes, base.sr)

    def run(batched: bool, backward: bool) -> None:
        p = code.planes.clone().requires_grad_(backward)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
            out = G.planes_wtri(type(code)(code.shared, p, code.sr), batched=batched, noise_mode="const")
        if backward:
            out.float().square().mean().backward()

    print(f"{network}, batch {batch}, {threads} thread(s), {'bf16' if bf16 else 'fp32'}, median of {repeats}")
    print("| pass | three calls (s) | one grouped call (s) | three / grouped |")
    print("|---|---|---|---|")
    for backward in (False, True):
        loop = _time(lambda: run(False, backward), repeats)
        grouped = _time(lambda: run(True, backward), repeats)
        name = "forward + backward" if backward else "forward"
        print(f"| {name} | {loop:.4f} | {grouped:.4f} | {loop / grouped:.2f}x |")


if __name__ == "__main__":
    main()
