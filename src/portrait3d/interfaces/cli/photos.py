"""Photo commands that need no generator: align and identity."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from portrait3d.errors import UsageError
from portrait3d.face.errors import FaceError
from portrait3d.interfaces.cli.base import fail_cleanly, main
from portrait3d.interfaces.cli.options import echo_notes, run_batch_command, threads_option, wants_batch, workers_option
from portrait3d.utils.batch import BatchItem, BatchSummary, ItemTask, WorkerInfo, done_records
from portrait3d.utils.compute import setup_compute
from portrait3d.utils.io import write_text


@main.command()
@click.argument("photos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--style", type=click.Choice(["ffhq", "eg3d", "default"]), default="default",
              help="Crop recipe: FFHQ (StyleGAN/e4e/PTI), EG3D in-the-wild, or portrait3d's default models.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--size", type=click.IntRange(32, 4096), default=None,
              help="Aligned image side in pixels [default: 1024 ffhq, 512 eg3d, 128 default].")
@click.option("--face-index", type=click.IntRange(0), default=None,
              help="Which face when a photo has several (0 = largest) [default: the largest].")
@click.option("--detector", type=click.Choice(["mediapipe", "dlib", "dlib-hog"]), default="mediapipe",
              help="Face detector for the photos (mediapipe: BlazeFace with dlib's CNN as fallback).")
@click.option("--landmarks", type=click.Choice(["dlib", "mediapipe"]), default="dlib")
@click.option("--force", is_flag=True, help="Overwrite existing outputs (batch mode: redo every photo).")
@workers_option
@threads_option
@fail_cleanly
def align(photos: tuple[Path, ...], style: str, out: Path, size: int | None, face_index: int | None, detector: str,
          landmarks: str, force: bool, workers: int, threads: int | None) -> None:
    """Align PHOTOS for a generator and estimate their EG3D cameras.

    One photo: writes OUT/<name>.png and OUT/cameras.json laid out like EG3D's dataset.json
    ({"labels": [[file, [25 floats]], ...]}), plus OUT/poses.json with yaw/pitch/roll in degrees.
    A bad photo leaves OUT untouched.

    \b
    Several photos, a folder or a glob (batch mode, resumable):
      portrait3d align 'photos/*.jpg' --out aligned --workers 2

    This writes OUT/<key>/aligned.png per photo, OUT/manifest.json, and at the end OUT/cameras.json and OUT/poses.json
    over every aligned photo in OUT (file names "<key>/aligned.png"). A bad photo is recorded as failed and the
    others go on; rerunning skips what is done. Exit status 0 all done, 1 some photos failed, 3 a bug.
    """
    setup_compute("cpu", threads)  # face detection and landmarks run on the CPU
    if wants_batch(photos):
        _align_batch(photos, style, out, size, face_index, detector, landmarks, force, workers)
        return
    from tqdm import tqdm

    from portrait3d.face.io import save_image
    from portrait3d.face.pipeline import FacePipeline

    for p in photos:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such photo")
    names = [p.stem + ".png" for p in photos]
    if len(set(names)) != len(names):
        raise UsageError("two input photos share a file name; their outputs would collide")
    targets = [out / n for n in names] + [out / "cameras.json", out / "poses.json"]
    if not force:
        for t in targets:
            if t.exists():
                raise FileExistsError(f"{t} already exists (pass --force to overwrite)")
    results = []
    with FacePipeline(style=style, output_size=size, detector=detector, landmarks=landmarks) as pipe:
        for photo in tqdm(photos, desc="aligning", unit="photo", disable=len(photos) < 2):
            try:
                results.append(pipe(photo, face_index=face_index))
            except (FaceError, ValueError) as e:
                msg = str(e)  # image-reading errors already name the file
                raise type(e)(msg if msg.startswith(f"{photo.name}:") or msg.startswith(f"{photo}:")
                              else f"{photo}: {msg}") from None
        pose_notes = [n for photo, r in zip(photos, results) for n in pipe.pose_notes(r, photo.name)]
    from portrait3d.face.pipeline import several_faces_note

    for photo, r in zip(photos, results):
        echo_notes(several_faces_note(r, face_index, photo.name))
    echo_notes(pose_notes, "warning")
    labels, poses = [], {}
    for name, r in zip(names, results):
        save_image(out / name, r.aligned.image, overwrite=force)
        labels.append([name, [round(float(v), 8) for v in r.camera.tolist()]])
        poses[name] = {"yaw_deg": r.pose.yaw_deg, "pitch_deg": r.pose.pitch_deg, "roll_deg": r.pose.roll_deg,
                       "faces_found": r.num_faces, "reprojection_error_px": r.pose.reprojection_error}
    write_text(out / "cameras.json", json.dumps({"labels": labels}, indent=1), overwrite=force)
    write_text(out / "poses.json", json.dumps(poses, indent=1), overwrite=force)
    click.echo(f"wrote {len(results)} aligned image(s), cameras.json and poses.json to {out}")


ALIGNED_NAME = "aligned.png"
"""The aligned crop in each OUT/<key>/ folder of a batch."""


@dataclass
class AlignTask(ItemTask):
    """Batch ``align``: one photo -> OUT/<key>/aligned.png; its camera and pose go to the manifest."""

    style: str
    size: int | None
    face_index: int | None
    detector: str
    landmarks: str
    _pipe: Any = field(default=None, init=False, repr=False, compare=False)

    def setup(self, worker: WorkerInfo) -> None:
        from portrait3d.face.pipeline import FacePipeline

        self._pipe = FacePipeline(style=self.style, output_size=self.size, detector=self.detector,
                                  landmarks=self.landmarks)

    def run(self, item: BatchItem, out_dir: Path) -> dict[str, Any]:
        from portrait3d.face.io import save_image

        r = self._pipe(item.path, face_index=self.face_index)
        save_image(out_dir / ALIGNED_NAME, r.aligned.image)
        return {"camera": [round(float(v), 8) for v in r.camera.tolist()], "yaw_deg": float(r.pose.yaw_deg),
                "pitch_deg": float(r.pose.pitch_deg), "roll_deg": float(r.pose.roll_deg), "faces_found": r.num_faces,
                "reprojection_error_px": float(r.pose.reprojection_error)}

    def teardown(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pipe": None}  # the native graphs stay in the process that built them


def _align_batch(photos: tuple[Path, ...], style: str, out: Path, size: int | None, face_index: int | None,
                 detector: str, landmarks: str, force: bool, workers: int) -> None:
    """``align`` on several photos / a folder / a glob, resumable (see :mod:`portrait3d.utils.batch`)."""
    task = AlignTask(style=style, size=size, face_index=face_index, detector=detector, landmarks=landmarks)
    config = {"command": "align", "style": style, "size": size, "face_index": face_index, "detector": detector,
              "landmarks": landmarks}
    run_batch_command(photos, out, task, desc="aligning", config=config, workers=workers, force=force,
                      reserved=("cameras.json", "poses.json"), after=_write_align_summaries)


def _write_align_summaries(summary: BatchSummary) -> None:
    """OUT/cameras.json (EG3D dataset.json layout) and OUT/poses.json over every photo aligned in OUT so far, from
    all ranks' manifests.

    Under torchrun every rank writes them when it finishes. A rank re-reads the manifests after writing and writes
    again if another rank finished meanwhile, so the files written last hold every rank's results.
    """

    written = None
    for _ in range(100):  # stops as soon as no rank finished during the write
        records = [r for r in done_records(summary.out) if "camera" in r.result]
        state = [(r.key, r.finished) for r in records]
        if state == written:
            return
        labels, poses = [], {}
        for rec in records:
            name = f"{rec.key}/{ALIGNED_NAME}"
            labels.append([name, rec.result["camera"]])
            poses[name] = {k: rec.result.get(k) for k in ("yaw_deg", "pitch_deg", "roll_deg", "faces_found",
                                                          "reprojection_error_px")}
        for fname, obj in (("cameras.json", {"labels": labels}), ("poses.json", poses)):
            write_text(summary.out / fname, json.dumps(obj, indent=1), overwrite=True)
        written = state


@main.command()
@click.argument("photo_a", type=click.Path(path_type=Path))
@click.argument("photo_b", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["port", "dlib"]), default="port",
              help="portrait3d's differentiable PyTorch port of dlib's network, or dlib itself.")
@click.option("--face-index-a", type=click.IntRange(0), default=None, help="Face in PHOTO_A (0 = largest).")
@click.option("--face-index-b", type=click.IntRange(0), default=None, help="Face in PHOTO_B (0 = largest).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder of batch mode (PHOTO_A a folder or glob): OUT/<key>/identity.json per photo.")
@click.option("--force", is_flag=True, help="Batch mode: redo every photo.")
@workers_option
@threads_option
@fail_cleanly
def identity(photo_a: Path, photo_b: Path, backend: str, face_index_a: int | None,
             face_index_b: int | None, out: Path | None, force: bool, workers: int, threads: int | None) -> None:
    """Say whether two photos show the same person (dlib's 128-D descriptor, distance threshold 0.6).

    \b
    PHOTO_A may be a folder or a glob: each of its photos is compared with PHOTO_B (resumable batch mode):
      portrait3d identity 'people/*.jpg' reference.jpg --out ids
    """
    setup_compute("cpu", threads)  # face detection and landmarks run on the CPU
    from portrait3d.face.pipeline import compare_photos

    if wants_batch([photo_a]):
        if out is None:
            raise UsageError("comparing a folder or glob of photos needs --out (where the manifest goes)")
        if not photo_b.is_file():
            raise FileNotFoundError(f"{photo_b}: no such photo")
        task = IdentityTask(photo_b=str(photo_b.resolve()), backend=backend, face_index_a=face_index_a,
                            face_index_b=face_index_b)
        config = {"command": "identity", **{k: v for k, v in task.__dict__.items()}}
        run_batch_command([photo_a], out, task, desc="comparing", config=config, workers=workers, force=force,
                          after=_echo_verdicts)
        return
    r = compare_photos(photo_a, photo_b, backend=backend, face_index_a=face_index_a, face_index_b=face_index_b)
    echo_notes(r["notes"])
    click.echo(_verdict_line(r))


def _verdict(r: dict[str, Any]) -> str:
    return "same person" if r["same_person"] else "different people"


def _verdict_line(r: dict[str, Any]) -> str:
    """The verdict first with the number it rests on (the distance), then the cosine for reference."""
    return (f"{_verdict(r)}: distance {r['distance']:.4f} (same person below {r['threshold']}), "
            f"cosine similarity {r['cosine']:.4f}")


@dataclass
class IdentityTask(ItemTask):
    """Batch ``identity``: one PHOTO_A against PHOTO_B -> OUT/<key>/identity.json."""

    photo_b: str
    backend: str
    face_index_a: int | None
    face_index_b: int | None

    def run(self, item: BatchItem, out_dir: Path) -> dict[str, Any]:
        from portrait3d.face.pipeline import compare_photos

        r = compare_photos(item.path, self.photo_b, backend=self.backend, face_index_a=self.face_index_a,
                           face_index_b=self.face_index_b)
        r = {k: v if k == "notes" else bool(v) if k == "same_person" else float(v)
             for k, v in r.items()}  # numpy scalars -> JSON
        (out_dir / "identity.json").write_text(json.dumps({"photo_a": str(item.path), "photo_b": self.photo_b, **r},
                                                          indent=1))
        return r


def _echo_verdicts(summary: BatchSummary) -> None:
    """One line per compared photo of this batch, as the single-pair command prints it."""
    for rec in summary.records:
        if rec.status == "done":
            r = rec.result
            click.echo(f"{rec.path}: {_verdict_line(r)}")
