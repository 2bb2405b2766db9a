"""Forward / forward+backward timings of portrait3d's generators with random weights.

Builds networks from fixed-seed random weights (no checkpoint needed) and times:

* StyleGAN2 at 64, 128 and 256 px (z/w 512, 8 mapping layers, channel_base 16384,
  channel_max 512, 'skip' architecture, num_fp16_res 4 -- fp16 is only active on CUDA;
  on CPU the blocks run in float32, as the official code does);
* EG3D at the 128 px parity-fixture configuration (``shared/fixtures/parity/eg3d_128.json``:
  backbone channel_base 4096 / channel_max 128, 2 mapping layers, SuperresolutionHybrid2X,
  24 + 24 depth samples, 32 px neural rendering), with ``deterministic=True`` and ``False``.

"fwd" is mapping + synthesis under ``torch.no_grad()`` (``noise_mode='const'``).
"fwd+bwd" is synthesis of ``ws`` that requires grad, ``loss = image.square().mean()`` and
``loss.backward()``: the gradient w.r.t. ``ws`` that GAN inversion needs (the weights are
frozen, as they are during inversion). Each time is the median (and min) of ``--repeats``
timed runs after ``--warmup`` untimed ones.

Run from the repository root::

    PYTHONPATH=src python bench/bench_networks.py --help
    PYTHONPATH=src python bench/bench_networks.py --device cpu --repeats 2
    PYTHONPATH=src python bench/bench_networks.py --only eg3d --json eg3d_times.json

Timings are machine-dependent (CPU model, thread count, GPU, torch build); compare
numbers only within one run or across runs on the same machine. The ratios printed at
the end are measured within the single run and travel better than absolute times.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import click
import torch

from portrait3d.networks.eg3d.camera import camera_from_angles
from portrait3d.networks.eg3d.triplane import EG3DConfig, RenderingConfig, TriPlaneGenerator
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

try:  # progress bars are optional
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None

SEED = 0
STYLEGAN2_RESOLUTIONS = (64, 128, 256)
STYLEGAN2_CHANNEL_BASE = 16384  # stylegan2-ada "paper256": 512 ch up to 32 px, then 256/128/64 at 64/128/256 px
STYLEGAN2_CHANNEL_MAX = 512


# --------------------------------------------------------------------------------------------
# Network configurations
# --------------------------------------------------------------------------------------------

def stylegan2_config(resolution: int) -> StyleGAN2Config:
    """The StyleGAN2 configuration the default (unconditional) models use, at ``resolution``."""
    return StyleGAN2Config(
        z_dim=512, c_dim=0, w_dim=512, img_resolution=resolution, img_channels=3,
        mapping=MappingConfig(num_layers=8),
        synthesis=SynthesisConfig(channel_base=STYLEGAN2_CHANNEL_BASE, channel_max=STYLEGAN2_CHANNEL_MAX,
                                  num_fp16_res=4, conv_clamp=256, architecture="skip"))


def eg3d_fixture_config() -> EG3DConfig:
    """EG3D at the parity fixture's ``init_kwargs`` (``eg3d_128.json``), written out here."""
    return EG3DConfig(
        z_dim=512, c_dim=25, w_dim=512, img_resolution=128, img_channels=3,
        neural_rendering_resolution=32, sr_num_fp16_res=4,
        mapping=MappingConfig(num_layers=2, w_avg_beta=0.998),
        backbone=SynthesisConfig(channel_base=4096, channel_max=128, num_fp16_res=0, conv_clamp=None),
        sr_fused_modconv_default="inference_only",
        rendering=RenderingConfig(
            image_resolution=128, superresolution_module="training.superresolution.SuperresolutionHybrid2X",
            sr_antialias=True, superresolution_noise_mode="none", disparity_space_sampling=False,
            clamp_mode="softplus", c_gen_conditioning_zero=False, c_scale=1.0,
            depth_resolution=24, depth_resolution_importance=24, ray_start=2.25, ray_end=3.3, box_warp=1.0,
            avg_camera_radius=2.7, avg_camera_pivot=[0.0, 0.0, 0.2]))


def channel_schedule(synthesis: torch.nn.Module) -> str:
    """E.g. ``4:512 8:512 ... 256:64`` -- output channels of each synthesis block."""
    parts = []
    for res in synthesis.block_resolutions:
        block = getattr(synthesis, f"b{res}")
        parts.append(f"{res}:{block.conv1.weight.shape[0]}")
    return " ".join(parts)


def build(net_cls: type, config: object, device: torch.device) -> torch.nn.Module:
    """Fixed-seed random weights, eval mode, frozen (only ``ws`` gets gradients)."""
    torch.manual_seed(SEED)
    return net_cls(config).eval().requires_grad_(False).to(device)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    resolution: int
    batch: int
    fwd_ms: float
    fwd_min_ms: float
    fwd_bwd_ms: float
    fwd_bwd_min_ms: float
    peak_mem_mb: float | None = None
    notes: str = ""
    fwd_times_ms: list[float] = field(default_factory=list)
    fwd_bwd_times_ms: list[float] = field(default_factory=list)

    @property
    def bwd_ratio(self) -> float:
        return self.fwd_bwd_ms / self.fwd_ms


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure(name: str, resolution: int, batch: int, fwd: Callable[[], object], fwd_bwd: Callable[[], object],
            device: torch.device, warmup: int, repeats: int, notes: str = "") -> Result:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_fwd = time_fn(fwd, device, warmup, repeats)
    t_bwd = time_fn(fwd_bwd, device, warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return Result(name=name, resolution=resolution, batch=batch,
                  fwd_ms=statistics.median(t_fwd), fwd_min_ms=min(t_fwd),
                  fwd_bwd_ms=statistics.median(t_bwd), fwd_bwd_min_ms=min(t_bwd),
                  peak_mem_mb=peak, notes=notes, fwd_times_ms=t_fwd, fwd_bwd_times_ms=t_bwd)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

def bench_stylegan2(resolution: int, batch: int, device: torch.device, warmup: int, repeats: int) -> Result:
    G = build(Generator, stylegan2_config(resolution), device)
    gen = torch.Generator().manual_seed(SEED)
    z = torch.randn([batch, G.z_dim], generator=gen).to(device)
    with torch.no_grad():
        ws0 = G.mapping(z, None, truncation_psi=1)

    def fwd() -> object:
        with torch.no_grad():
            ws = G.mapping(z, None, truncation_psi=1)
            return G.synthesis(ws, noise_mode="const")

    def fwd_bwd() -> object:
        ws = ws0.detach().clone().requires_grad_(True)
        img = G.synthesis(ws, noise_mode="const")
        img.square().mean().backward()
        return ws.grad

    notes = f"channels {channel_schedule(G.synthesis)}"
    return measure(f"stylegan2-{resolution}", resolution, batch, fwd, fwd_bwd, device, warmup, repeats, notes)


def bench_eg3d(G: TriPlaneGenerator, batch: int, deterministic: bool, device: torch.device, warmup: int,
               repeats: int) -> Result:
    gen = torch.Generator().manual_seed(SEED)
    z = torch.randn([batch, G.z_dim], generator=gen).to(device)
    yaws = torch.linspace(-20.0, 20.0, batch) if batch > 1 else torch.zeros(1)
    c = camera_from_angles(yaws, torch.zeros(batch)).to(device)
    with torch.no_grad():
        ws0 = G.mapping(z, c, truncation_psi=1)
    kwargs = dict(neural_rendering_resolution=G.config.neural_rendering_resolution, noise_mode="const",
                  deterministic=deterministic)

    def fwd() -> object:
        with torch.no_grad():
            ws = G.mapping(z, c, truncation_psi=1)
            return G.synthesis(ws, c, **kwargs)["image"]

    def fwd_bwd() -> object:
        ws = ws0.detach().clone().requires_grad_(True)
        img = G.synthesis(ws, c, **kwargs)["image"]
        img.square().mean().backward()
        return ws.grad

    r = G.config.rendering
    notes = (f"det={deterministic}, nr {G.config.neural_rendering_resolution}px, "
             f"depth {r.depth_resolution}+{r.depth_resolution_importance}")
    name = f"eg3d-128-{'det' if deterministic else 'stoch'}"
    return measure(name, G.img_resolution, batch, fwd, fwd_bwd, device, warmup, repeats, notes)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def format_table(results: list[Result], cuda: bool) -> str:
    header = ["case", "res", "batch", "fwd ms", "(min)", "fwd+bwd ms", "(min)", "fwd ms/img",
              "f+b ms/img", "f+b/fwd"]
    if cuda:
        header.append("peak MiB")
    rows = []
    for r in results:
        row = [r.name, str(r.resolution), str(r.batch), f"{r.fwd_ms:.1f}", f"{r.fwd_min_ms:.1f}",
               f"{r.fwd_bwd_ms:.1f}", f"{r.fwd_bwd_min_ms:.1f}", f"{r.fwd_ms / r.batch:.1f}",
               f"{r.fwd_bwd_ms / r.batch:.1f}", f"{r.bwd_ratio:.2f}"]
        if cuda:
            row.append(f"{r.peak_mem_mb:.0f}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    return "\n".join(out)


def ratios(results: list[Result]) -> dict[str, float]:
    """EG3D / StyleGAN2-128 (same run), per image, so differing batch sizes compare fairly."""
    by_name = {r.name: r for r in results}
    ref = by_name.get("stylegan2-128")
    out: dict[str, float] = {}
    if ref is None:
        return out
    for r in results:
        if r.name.startswith("eg3d"):
            out[f"{r.name} fwd / stylegan2-128 fwd (per image)"] = (r.fwd_ms / r.batch) / (ref.fwd_ms / ref.batch)
            out[f"{r.name} fwd+bwd / stylegan2-128 fwd+bwd (per image)"] = (
                (r.fwd_bwd_ms / r.batch) / (ref.fwd_bwd_ms / ref.batch))
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=default_device,
              show_default="cuda if available else cpu", help="Device to run on.")
@click.option("--batch", type=click.IntRange(min=1), default=None, show_default="4 for StyleGAN2, 2 for EG3D",
              help="Batch size for every case (overrides --sg2-batch / --eg3d-batch).")
@click.option("--sg2-batch", type=click.IntRange(min=1), default=4, show_default=True, help="StyleGAN2 batch size.")
@click.option("--eg3d-batch", type=click.IntRange(min=1), default=2, show_default=True, help="EG3D batch size.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per measurement.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default="leave torch's default",
              help="torch.set_num_threads for CPU runs.")
@click.option("--only", type=click.Choice(["stylegan2", "eg3d", "all"]), default="all", show_default=True,
              help="Which networks to time.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results (and run metadata) to this JSON file.")
def main(device: str, batch: int | None, sg2_batch: int, eg3d_batch: int, repeats: int, warmup: int,
         threads: int | None, only: str, json_path: Path | None) -> None:
    """Time forward and forward+backward (gradient w.r.t. ws) of random-weight StyleGAN2 and EG3D."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available in this torch build / machine", param_hint="--device")
    if threads is not None:
        torch.set_num_threads(threads)
    if batch is not None:
        sg2_batch = eg3d_batch = batch
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    meta = {"device": device, "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor()
            or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "repeats": repeats, "warmup": warmup, "seed": SEED,
            "stylegan2_channel_base": STYLEGAN2_CHANNEL_BASE, "stylegan2_channel_max": STYLEGAN2_CHANNEL_MAX}
    click.echo(f"device: {device} ({meta['device_name']})   torch {meta['torch']}   threads: {meta['threads']}")
    click.echo(f"median (and min) of {repeats} timed run(s) after {warmup} warm-up run(s); timings are "
               f"machine-dependent")
    if not cuda:
        click.echo("note: fp16 blocks (num_fp16_res) only run in fp16 on CUDA; on CPU everything is float32")

    cases: list[tuple[str, Callable[[], Result]]] = []
    if only in ("stylegan2", "all"):
        for res in STYLEGAN2_RESOLUTIONS:
            cases.append((f"stylegan2-{res}",
                          lambda res=res: bench_stylegan2(res, sg2_batch, dev, warmup, repeats)))
    if only in ("eg3d", "all"):
        eg3d: list[TriPlaneGenerator] = []  # built once, shared by both sampling modes

        def eg3d_case(deterministic: bool) -> Result:
            if not eg3d:
                eg3d.append(build(TriPlaneGenerator, eg3d_fixture_config(), dev))
            return bench_eg3d(eg3d[0], eg3d_batch, deterministic, dev, warmup, repeats)

        cases.append(("eg3d-128-det", lambda: eg3d_case(True)))
        cases.append(("eg3d-128-stoch", lambda: eg3d_case(False)))

    results: list[Result] = []
    bar = tqdm(cases, desc="bench", unit="case") if tqdm is not None else None
    log = tqdm.write if tqdm is not None else click.echo
    for i, (name, run) in enumerate(bar if bar is not None else cases):
        if bar is not None:
            bar.set_postfix_str(name)
        else:
            click.echo(f"[{i + 1}/{len(cases)}] {name} ...")
        r = run()
        results.append(r)
        log(f"  {r.name}: fwd {r.fwd_ms:.1f} ms, fwd+bwd {r.fwd_bwd_ms:.1f} ms  ({r.notes})")
    if bar is not None:
        bar.close()

    click.echo("")
    click.echo(format_table(results, cuda))
    rat = ratios(results)
    if rat:
        click.echo("")
        click.echo("ratios (this run):")
        for k, v in rat.items():
            click.echo(f"  {k}: {v:.2f}")
    click.echo("  fwd+bwd / fwd per case: see the 'f+b/fwd' column")

    if json_path is not None:
        payload = {"meta": meta, "results": [{**asdict(r), "fwd_bwd_over_fwd": r.bwd_ratio} for r in results],
                   "ratios": rat}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2))
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
