"""StyleGAN2 synthesis on a CPU: the grouped ("fused") modulated convolution against the shared one with scaled
activations (``fused_modconv=False``, the CPU default since 2026-12-07), with and without gradients, fp32 and bf16.

    PYTHONPATH=src python bench/bench_modconv.py --network default-2d --threads 1

Prints the seconds per call (median of --repeats after a warm-up) and the fused / shared ratio measured in this run,
and the largest difference between the two paths' images (the same maths, so float rounding only).
"""

from __future__ import annotations

import statistics
import time

import click
import torch


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@click.command(context_settings={"show_default": True})
@click.option("--network", default="default-2d", help="StyleGAN2 checkpoint path or built-in name.")
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 8), help="Batch sizes (repeat).")
@click.option("--repeats", type=click.IntRange(min=1), default=5)
@click.option("--threads", type=click.IntRange(min=1), default=1)
def main(network: str, batches: tuple[int, ...], repeats: int, threads: int) -> None:
    from portrait3d.checkpoints import load_network

    torch.set_num_threads(threads)
    G = load_network(network).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    print(f"{network}: {G.img_resolution} px, {threads} thread(s), median of {repeats}")
    print("| batch | gradients | precision | fused (s) | shared (s) | fused / shared |")
    print("|---|---|---|---|---|---|")
    for n in batches:
        ws = G.mapping(torch.randn([n, G.z_dim], generator=gen), None)
        with torch.no_grad():
            a = G.synthesis(ws, noise_mode="const", fused_modconv=True)
            b = G.synthesis(ws, noise_mode="const", fused_modconv=False)
        diff = float((a - b).abs().max())
        for grad in (False, True):
            for bf16 in (False, True):
                def run(fused: bool) -> None:
                    w = ws.detach().requires_grad_(grad)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(grad):
                        img = G.synthesis(w, noise_mode="const", fused_modconv=fused)
                    if grad:
                        img.float().square().mean().backward()

                tf, ts = _time(lambda: run(True), repeats), _time(lambda: run(False), repeats)
                print(f"| {n} | {'yes' if grad else 'no'} | {'bf16' if bf16 else 'fp32'} | {tf:.4f} | {ts:.4f} | "
                      f"{tf / ts:.2f} |")
        print(f"batch {n}: largest |fused - shared| pixel difference (fp32) {diff:.2e}")


if __name__ == "__main__":
    main()
