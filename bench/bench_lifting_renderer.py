"""Forward and forward+backward timings of the LiftedGAN renderer (hard z-buffer vs soft rasteriser).

Renders a random smooth depth map with a random texture at a 30 deg yaw / 10 deg pitch view, as one
lifting training step does several times, and prints the best of ``--repeats`` runs per rasteriser
and the soft / hard ratio measured in this run. CPU timings depend on the thread count.

    PYTHONPATH=src python bench/bench_lifting_renderer.py --size 64 --batch 4 --threads 1
"""

from __future__ import annotations

import math
import time

import click
import torch


def time_renderer(mode: str, size: int, batch: int, repeats: int, device: str) -> tuple[float, float]:
    """Best forward and forward+backward seconds of :func:`render` with rasteriser ``mode``."""
    from portrait3d.methods.lifting import RendererConfig, render

    g = torch.Generator().manual_seed(5)
    raw = torch.nn.functional.interpolate(torch.randn(batch, 1, 8, 8, generator=g), size=(size, size),
                                          mode="bilinear")
    cfg = RendererConfig(image_size=size, rasterizer=mode)
    depth = cfg.rescale_depth(torch.tanh(raw[:, 0])).to(device).requires_grad_()
    image = torch.rand(batch, 3, size, size, generator=g).to(device).requires_grad_()
    view = torch.tensor([[math.radians(10.0), math.radians(30.0), 0, 0, 0, 0]] * batch, device=device,
                        requires_grad=True)
    fwd, both = math.inf, math.inf
    for _ in range(repeats + 1):                     # the first run warms caches up and is not counted
        t0 = time.perf_counter()
        with torch.no_grad():
            render(depth, image, view, cfg)
        t1 = time.perf_counter()
        out = render(depth, image, view, cfg)
        (out.image.sum() + out.mask.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if _ > 0:
            fwd, both = min(fwd, t1 - t0), min(both, t2 - t1)
    return fwd, both


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--size", type=click.IntRange(8, 512), default=64, help="Render resolution.")
@click.option("--batch", type=click.IntRange(1), default=4, help="Images per render.")
@click.option("--repeats", type=click.IntRange(1), default=3, help="Timed runs (best is printed).")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Device.")
def main(size: int, batch: int, repeats: int, threads: int, device: str) -> None:
    """Time the pure-PyTorch LiftedGAN renderer."""
    torch.set_num_threads(threads)
    times = {}
    for mode in ("hard", "soft"):
        fwd, both = time_renderer(mode, size, batch, repeats, device)
        times[mode] = both
        click.echo(f"renderer {mode}: {size} px batch {batch}: forward {fwd * 1e3:.1f} ms, "
                   f"forward+backward {both * 1e3:.1f} ms ({device}, {threads} thread(s))")
    click.echo(f"soft / hard forward+backward: {times['soft'] / times['hard']:.2f}x")


if __name__ == "__main__":
    main()
