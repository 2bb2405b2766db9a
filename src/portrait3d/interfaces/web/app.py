"""The web editor's page (gradio Blocks): upload a photo or pick a seed, choose a method, move sliders.

:class:`EditorApp` owns the method adapters (:mod:`.methods`) and a private temporary folder for the files
it offers for download; :meth:`EditorApp.build` lays out the page and wires the events:

* a photo upload or the seed button runs the method's slow :meth:`~.methods.MethodAdapter.embed` once (with a
  progress bar) and keeps the result in the browser session's ``gr.State``;
* every slider ``change`` re-renders from that cached embedding (``trigger_mode="always_last"``: while a
  slider is dragged, only the newest position waits to be rendered);
* the download buttons write the image, the orbit video or the mesh into a fresh sub-folder of the private
  folder and hand it to a ``gr.File``.

Errors the user can fix (a bad upload, no face, a method without its model) become one line in the status
box and one gradio warning; anything else is logged with its traceback and reported as an internal error
in the same way, so the server never stops. Only the uploaded bytes are read (``gr.File(type="binary")``),
never a path chosen by the client. Analytics and every other outgoing call of gradio are switched off: the
editor works offline.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# gradio reads these when it would phone home (analytics, version check) and huggingface_hub before any
# download: both are set before gradio is imported, so the editor never opens an outgoing connection.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import gradio as gr

from portrait3d.errors import UsageError
from portrait3d.interfaces.web.methods import (
    ADAPTERS,
    Control,
    Embedding,
    MethodAdapter,
    MethodSettings,
    build_registry,
)
from portrait3d.interfaces.web.upload import ACCEPTED_FORMATS, UploadLimits, decode_upload

__all__ = ["EditorApp", "WebConfig", "launch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebConfig:
    """Everything ``portrait3d web`` configures.

    Attributes:
        host: interface to listen on (``127.0.0.1``: this computer only).
        port: TCP port.
        methods: the adapters' models and speed settings.
        limits: what an upload may be.
        threads: torch CPU threads (``None``: leave torch's setting).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    methods: MethodSettings = field(default_factory=MethodSettings)
    limits: UploadLimits = field(default_factory=UploadLimits)
    threads: int | None = None


# The generators make 128 px images: let them fill their boxes instead of sitting small in the middle.
_CSS = "#result-image img, #aligned-image img {width: 100%; height: 100%; object-fit: contain;}"

# the outputs of an embedding event, in this order: state, source, result image, aligned crop, status, sliders
_EMBED_OUTPUTS = 5


class EditorApp:
    """The editor: adapters, a private download folder, the event handlers and the page.

    The handlers are plain methods, usable without a browser; :meth:`build` wires them to the page.
    Call :meth:`close` to delete the download folder.
    """

    def __init__(self, config: WebConfig = WebConfig(),
                 adapters: tuple[type[MethodAdapter], ...] = ADAPTERS) -> None:
        config.methods.validate()
        config.limits.validate()
        self.config = config
        self.adapters = build_registry(config.methods, adapters)
        self.availability = {k: a.available() for k, a in self.adapters.items()}
        self.num_sliders = max([len(a.controls()) for a in self.adapters.values()] + [1])
        # Downloads live here, readable by this user only; nothing else is written by the editor.
        self._tmp = tempfile.TemporaryDirectory(prefix="portrait3d-web-")
        self.workdir = Path(self._tmp.name)
        os.chmod(self.workdir, 0o700)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Delete the download folder."""
        self._tmp.cleanup()

    # ------------------------------------------------------------------ helpers
    def default_method(self) -> str:
        """The first available method (else the first one)."""
        return next((k for k, av in self.availability.items() if av.ok), next(iter(self.adapters)))

    def _adapter(self, key: str | None) -> MethodAdapter:
        if key not in self.adapters:
            raise UsageError(f"unknown method {key!r}")
        return self.adapters[key]

    def methods_markdown(self) -> str:
        """One line per method: its title and summary, or why it is unavailable."""
        lines = []
        for key, a in self.adapters.items():
            av = self.availability[key]
            lines.append(f"- **{a.title}**: {a.summary}" if av.ok else
                         f"- **{a.title}**: unavailable: {av.reason}")
        return "\n".join(lines)

    def slider_updates(self, key: str, values: dict[str, float] | None = None) -> list[Any]:
        """gradio updates of the slider pool for method ``key`` (unused sliders hidden)."""
        controls: tuple[Control, ...] = self._adapter(key).controls() if self.availability[key].ok else ()
        values = values or {}
        out = []
        for i in range(self.num_sliders):
            if i < len(controls):
                c = controls[i]
                out.append(gr.update(visible=True, label=c.label, minimum=c.minimum, maximum=c.maximum, step=c.step,
                                     value=c.snap(values.get(c.key, c.value)), info=c.info, interactive=True))
            else:
                out.append(gr.update(visible=False))
        return out

    def _values(self, adapter: MethodAdapter, sliders: tuple[Any, ...]) -> dict[str, float]:
        """Slider pool values -> ``{control key: value}``."""
        return {c.key: float(v) for c, v in zip(adapter.controls(), sliders) if v is not None}

    def _folder(self) -> Path:
        """A fresh folder for one download (names never clash between sessions)."""
        return Path(tempfile.mkdtemp(dir=self.workdir))

    @staticmethod
    def _report(error: BaseException) -> str:
        """The one line shown for ``error``; unexpected errors are logged with their traceback."""
        if isinstance(error, UsageError):
            msg = str(error)
        else:
            log.exception("portrait3d web: internal error")
            msg = f"internal error ({type(error).__name__}: {error}); see the terminal"
        gr.Warning(msg)
        return f"Error: {msg}"

    # ------------------------------------------------------------------ embedding (slow)
    def embed(self, key: str, source: int | np.ndarray | None, progress: Callable[[float, str], None],
              method_changed: bool = False) -> tuple:
        """Embed ``source`` with method ``key``; returns the embedding event's outputs.

        A failure keeps the previous embedding, unless the method changed (it no longer matches the sliders).
        """
        adapter = self._adapter(key)
        if source is None:
            return (None, gr.skip(), None, None, "Upload a photo or choose a seed.", *self.slider_updates(key))
        try:
            state = adapter.embed(source, progress)
            # Start from values the sliders can show: the sliders' own change events then render the very
            # same image (same bytes), instead of a second, slightly different one.
            state.values = {c.key: c.snap(state.values.get(c.key, c.value)) for c in adapter.controls()}
            image = adapter.render(state, state.values)
        except Exception as e:  # noqa: BLE001  (reported, never fatal)
            if method_changed:
                return (None, gr.skip(), None, None, self._report(e), *self.slider_updates(key))
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), self._report(e), *[gr.skip()] * self.num_sliders)
        status = f"Ready: {adapter.title}, {state.source}. {state.note} Move the sliders to edit.".replace("  ", " ")
        return (state, source, image, state.aligned, status, *self.slider_updates(key, state.values))

    def on_photo(self, key: str, data: bytes | None,
                 progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's idiom)
        """A photo was uploaded: check it, then embed it. The last output clears a refused upload's file box."""
        if data is None:  # the upload was cleared
            return (gr.skip(),) * (_EMBED_OUTPUTS + self.num_sliders + 1)
        try:
            photo = decode_upload(data, self.config.limits)
        except UsageError as e:
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), self._report(e), *[gr.skip()] * self.num_sliders,
                    None)
        out = self.embed(key, photo, lambda f, d: progress(f, desc=d))
        refused = isinstance(out[4], str) and out[4].startswith("Error: ")
        return (*out, None if refused else gr.skip())

    def on_seed(self, key: str, seed: float | None,
                progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's idiom)
        """The seed button: embed a sampled face."""
        if seed is None or not float(seed).is_integer() or not 0 <= seed < 2**32:
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                    self._report(UsageError("the seed must be a whole number from 0 to 4294967295")),
                    *[gr.skip()] * self.num_sliders)
        return self.embed(key, int(seed), lambda f, d: progress(f, desc=d))

    def on_method(self, key: str, source: int | np.ndarray | None,
                  progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's idiom)
        """Another method was chosen: embed the current photo / seed again with it (or say why it cannot)."""
        av = self.availability.get(key)
        if av is not None and not av.ok:
            return (None, gr.skip(), None, None, f"{self._adapter(key).title} is unavailable: {av.reason}",
                    *self.slider_updates(key))
        return self.embed(key, source, lambda f, d: progress(f, desc=d), method_changed=True)

    def on_refine(self, state: Embedding | None,
                  progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's idiom)
        """The refine button: the slow optimisation after a fast first embedding (the W_tri encoder's code)."""
        if state is None:
            gr.Warning("Nothing to refine yet: upload a photo first.")
            return (gr.skip(),) * (3 + self.num_sliders)
        try:
            adapter = self._adapter(state.method)
            new = adapter.refine(state, lambda f, d: progress(f, desc=d))
            new.values = {c.key: c.snap(new.values.get(c.key, c.value)) for c in adapter.controls()}
            image = adapter.render(new, new.values)
        except Exception as e:  # noqa: BLE001  (reported, never fatal; the fast embedding stays)
            return (gr.skip(), gr.skip(), self._report(e), *[gr.skip()] * self.num_sliders)
        status = f"Ready: {adapter.title}, {new.source}, refined. {new.note} Move the sliders to edit."
        return (new, image, status.replace("  ", " "), *self.slider_updates(state.method, new.values))

    # ------------------------------------------------------------------ rendering (fast)
    def on_controls(self, state: Embedding | None, *sliders: float) -> Any:
        """A slider moved: render from the cached embedding."""
        if state is None:
            return gr.skip()
        try:
            adapter = self._adapter(state.method)
            return adapter.render(state, self._values(adapter, sliders))
        except Exception as e:  # noqa: BLE001
            self._report(e)
            return gr.skip()

    # ------------------------------------------------------------------ downloads
    def _export(self, state: Embedding | None, make: Callable[[MethodAdapter, Path], Path]) -> Any:
        """Update of a download box: shows the file ``make`` writes (hidden boxes appear once they hold one)."""
        if state is None:
            gr.Warning("Nothing to download yet: upload a photo or choose a seed first.")
            return gr.skip()
        try:
            return gr.update(value=str(make(self._adapter(state.method), self._folder())), visible=True)
        except Exception as e:  # noqa: BLE001
            self._report(e)
            return gr.skip()

    def on_image(self, state: Embedding | None, *sliders: float) -> Any:
        """The download-image button: the current view as PNG."""
        from portrait3d.face.io import save_image

        def make(a: MethodAdapter, folder: Path) -> Path:
            name = f"{a.key}_{state.source.replace(' ', '-')}.png"
            return save_image(folder / name, a.render(state, self._values(a, sliders)))

        return self._export(state, make)

    def on_video(self, state: Embedding | None,
                 progress: gr.Progress = gr.Progress()) -> Any:  # noqa: B008 (gradio's idiom)
        """The orbit-video button: an MP4 of the head turning."""
        from portrait3d.utils.video import write_mp4

        def make(a: MethodAdapter, folder: Path) -> Path:
            if "video" not in a.exports:
                raise UsageError(f"{a.title} makes no orbit video")
            progress(0.0, desc="rendering the orbit video")
            return write_mp4(a.orbit_frames(state), folder / "orbit.mp4", fps=self.config.methods.fps)

        return self._export(state, make)

    def on_mesh(self, state: Embedding | None,
                progress: gr.Progress = gr.Progress()) -> Any:  # noqa: B008 (gradio's idiom)
        """The mesh button: the head's mesh (PLY for EG3D, OBJ for LiftedGAN)."""

        def make(a: MethodAdapter, folder: Path) -> Path:
            if "mesh" not in a.exports:
                raise UsageError(f"{a.title} makes no mesh")
            progress(0.0, desc="extracting the mesh")
            return a.write_mesh(state, folder)

        return self._export(state, make)

    # ------------------------------------------------------------------ page
    def build(self) -> gr.Blocks:
        """The page; launch it with :func:`launch` (or ``.launch()`` with :meth:`launch_kwargs`)."""
        first = self.default_method()
        choices = [(a.title if self.availability[k].ok else f"{a.title} (unavailable)", k)
                   for k, a in self.adapters.items()]
        types = sorted({*ACCEPTED_FORMATS.values(), ".jpeg"})
        # old files in gradio's cache (one per rendered view) are deleted after an hour
        with gr.Blocks(title="portrait3d editor", analytics_enabled=False, delete_cache=(600, 3600)) as page:
            gr.Markdown("## portrait3d: portrait editor\nUpload a photo (JPEG, PNG or WebP, at most "
                        f"{self.config.limits.max_bytes / 2**20:g} MB) or generate a face from a seed, "
                        "then move the sliders.")
            state = gr.State(None)   # the Embedding of this browser session
            source = gr.State(None)  # the photo (pixels) or seed it came from, to re-embed on a method change
            with gr.Row():
                with gr.Column(scale=1):
                    method = gr.Dropdown(choices=choices, value=first, label="Method", elem_id="method")
                    gr.Markdown(self.methods_markdown(), elem_id="methods")
                    photo = gr.File(label="Photo", file_types=types, type="binary", elem_id="photo-upload")
                    with gr.Row():
                        seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, elem_id="seed")
                        seed_button = gr.Button("Generate from seed", elem_id="seed-button")
                    aligned = gr.Image(label="Aligned input", type="numpy", format="png", interactive=False,
                                       height=160, elem_id="aligned-image")
                with gr.Column(scale=2):
                    status = gr.Textbox(value="Upload a photo or choose a seed.", label="Status", interactive=False,
                                        lines=2, elem_id="status")
                    result = gr.Image(label="Result", type="numpy", format="png", interactive=False, height=384,
                                      elem_id="result-image")
                    sliders = [gr.Slider(visible=False, elem_id=f"control-{i}") for i in range(self.num_sliders)]
                    refine_button = gr.Button("Refine (optimise the fast first embedding)", elem_id="refine-button")
                    with gr.Row():
                        image_button = gr.Button("Download image", elem_id="download-image")
                        video_button = gr.Button("Orbit video", elem_id="download-video")
                        mesh_button = gr.Button("Mesh", elem_id="download-mesh")
                    with gr.Row():
                        files = [gr.File(label=label, interactive=False, visible=False, elem_id=f"{name}-file")
                                 for name, label in (("image", "Image (PNG)"), ("video", "Orbit video (MP4)"),
                                                     ("mesh", "Mesh"))]

            outs = [state, source, result, aligned, status, *sliders]
            # one embedding at a time: they are CPU-bound and would only slow each other down
            photo.upload(self.on_photo, [method, photo], [*outs, photo], concurrency_id="embed", concurrency_limit=1)
            seed_button.click(self.on_seed, [method, seed], outs, concurrency_id="embed", concurrency_limit=1)
            method.change(self.on_method, [method, source], outs, concurrency_id="embed", concurrency_limit=1)
            refine_button.click(self.on_refine, [state], [state, result, status, *sliders], concurrency_id="embed",
                                concurrency_limit=1)
            for s in sliders:
                s.change(self.on_controls, [state, *sliders], result, trigger_mode="always_last",
                         show_progress="hidden", concurrency_id="render", concurrency_limit=1)
            image_button.click(self.on_image, [state, *sliders], files[0], concurrency_id="export")
            video_button.click(self.on_video, [state], files[1], concurrency_id="export")
            mesh_button.click(self.on_mesh, [state], files[2], concurrency_id="export")
            page.load(lambda k: self.slider_updates(k), [method], sliders)
        return page

    def launch_kwargs(self) -> dict[str, Any]:
        """Arguments of ``Blocks.launch``: local only, no share link, no outgoing calls, the upload size limit."""
        return {"server_name": self.config.host, "server_port": self.config.port, "share": False,
                "inbrowser": False, "max_file_size": self.config.limits.max_bytes,
                "allowed_paths": [str(self.workdir)], "enable_monitoring": False, "mcp_server": False, "pwa": False,
                "ssr_mode": False, "show_error": False, "footer_links": [], "css": _CSS}


def launch(config: WebConfig, block: bool = True) -> tuple[EditorApp, gr.Blocks]:
    """Start the editor's server.

    Args:
        config: :class:`WebConfig`.
        block: serve until interrupted (then delete the download folder); ``False`` returns at once with the
            server running in the background (tests), and the caller closes both.
    Returns:
        ``(app, page)``.
    """
    import torch

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    app = EditorApp(config)
    page = app.build()
    if block and threading.current_thread() is threading.main_thread():
        # gradio stops on KeyboardInterrupt: make Ctrl-C work even when the shell started us with SIGINT ignored
        # (a background job), and let SIGTERM stop the server the same way, so the download folder is deleted.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        page.queue(default_concurrency_limit=1).launch(prevent_thread_lock=not block, **app.launch_kwargs())
    except BaseException as e:
        app.close()
        if isinstance(e, OSError) and "empty port" in str(e):  # gradio's wording for a port already in use
            raise UsageError(f"port {config.port} on {config.host} is in use: pass another --port") from None
        raise
    if block:
        app.close()
    return app, page


def _interrupt(signum: int, frame: object) -> None:
    """Signal handler: stop the way Ctrl-C does."""
    raise KeyboardInterrupt
