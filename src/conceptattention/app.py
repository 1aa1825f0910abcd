"""A web page to try ConceptAttention: a prompt (or an uploaded image) and concepts -> image, one
overlay per concept, the argmax segmentation, and the arrays to download.

Needs the optional extra: ``pip install "conceptattention[app]"``; start it with ``conceptattention app``.

The model is fixed when the page is launched (``launch(model=...)``) and shown read-only. Only with
``allow_model_choice=True`` does the page get a model box; then each visitor's request names its own
model, and the last :data:`MAX_LOADED` pipelines stay in memory (the launch model always among them).

Requests of every kind may run at once (up to :data:`CONCURRENCY` per button); one lock per loaded
pipeline serialises the calls on it (a pipeline is not thread-safe). Each request's files go to one
folder under the app's own temporary root, of which only the newest :data:`KEEP_REQUESTS` are kept
(the root is removed when the page is closed or the process ends), and Gradio's own cache is pruned
by age (:data:`GRADIO_CACHE`). Visitors see one readable message for every error, never a server path;
unexpected errors are logged here with their traceback.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import shutil
import tempfile
import threading
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConceptAttentionError

log = logging.getLogger(__name__)

KEEP_REQUESTS = 16  # request folders kept on disk (Gradio has copied them into its cache long before)
GRADIO_CACHE = (600, 3600)  # gr.Blocks(delete_cache=): every 10 min, delete Gradio's cached files over 1 h old
CONCURRENCY = 4  # requests of one button run at once (they wait on the pipeline's lock)
MAX_LOADED = 2  # pipelines kept in memory with allow_model_choice, the launch model included
SEED_MAX = 2**63 - 1
STEPS_MAX = 1000
SAMPLES_MAX = 64
NAME_MAX = 200  # longest model name a visitor may give

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])(?:~|[A-Za-z]:)?(?:[/\\][\w.\-]+){2,}[/\\]?")


class _AsWritten(ConceptAttentionError):
    """A message of the app's own, shown as is (it quotes the visitor's own text, not the server's)."""


def _model_key(name: str | None) -> str:
    return (name or "").strip() or "shapes"


def _display_name(model: str) -> str:
    """How the page names the launch model: a local folder by its last part, never its whole path."""
    key = _model_key(model)
    if key == "shapes":
        return key
    try:
        if Path(key).expanduser().exists():
            return Path(key).expanduser().resolve().name or "local model"
    except OSError:
        return "local model"
    return key


def _scrub(message: str) -> str:
    """``message`` with anything that looks like an absolute server path replaced by ``<path>``."""
    return _ABSOLUTE_PATH.sub("<path>", message)


def _words(text: Any) -> list[str]:
    from .pipelines.options import distinct_concepts

    words = [w for w in _text(text, "concepts").replace(",", " ").split() if w]
    if not words:
        raise ConceptAttentionError("enter at least one concept word, e.g. 'circle square grass'")
    return distinct_concepts(words)


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConceptAttentionError(f"{name} must be text")
    return value


def _integer(value: Any, name: str, low: int, high: int) -> int:
    """``value`` (an int, an integral float as gr.Number may give, or digits) as an int in [low, high]."""
    number: int | None = None
    if isinstance(value, bool) or value is None:
        number = None
    elif isinstance(value, float):
        number = int(value) if math.isfinite(value) and value.is_integer() else None
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    else:
        try:
            number = operator.index(value)
        except TypeError:
            number = None
    if number is None or not low <= number <= high:
        high_text = "2**63 - 1" if high == SEED_MAX else str(high)
        raise ConceptAttentionError(f"{name} must be an integer from {low} to {high_text}")
    return number


def _fraction(value: Any, name: str) -> float:
    """``value`` as a finite float in [0, 1]."""
    number: float | None = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ConceptAttentionError(f"{name} must be a number from 0 to 1")
    return number


def _load_image(path: Path) -> Any:
    """The picture at ``path``, read into memory (its file may be deleted afterwards)."""
    from PIL import Image

    with Image.open(path) as picture:
        picture.load()
        return picture.copy()


def _outputs(result: Any, folder: Path) -> tuple[Any, list, Any, str]:
    """(image, [(overlay, concept)], segmentation, zip path) for the page; only the zip stays in ``folder``."""
    from PIL import Image

    written = result.save(folder / "files")
    video = "video" in written  # a video result: its overlay videos stay in the folder, to play on the page
    if video:
        overlays = [(str(written[f"overlay:{c}"]), c) for c in result.concepts]
        segmentation = _load_image(written["grid"])  # frames x concepts
    else:
        overlays = [(_load_image(written[f"overlay:{c}"]), c) for c in result.concepts]
        segmentation = _load_image(written["segmentation"])
    archive = folder / "conceptattention_maps.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for key in ("maps", "maps_raw", "result", "image", "video", "segmentation", "grid"):
            if key in written:
                z.write(written[key], written[key].name)
    if not video:
        shutil.rmtree(folder / "files", ignore_errors=True)
    image = result.image
    if max(image.size) < 384:  # small images (the shapes model's 64 px) shown enlarged, pixels kept sharp
        scale = 384 // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image, overlays, segmentation, str(archive)


class RequestFolders:
    """One folder per request under one temporary root; only the newest ``keep`` folders are kept."""

    def __init__(self, keep: int = KEEP_REQUESTS) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="conceptattention-app-"))
        self._count = 0
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)  # at exit, too

    def new(self) -> Path:
        """A fresh empty folder; the oldest beyond ``keep`` are deleted."""
        with self._lock:
            self._count += 1
            self.root.mkdir(parents=True, exist_ok=True)  # again after remove(), should the page be relaunched
            folder = self.root / f"request-{self._count:012d}"
            folder.mkdir()
            kept = sorted(p for p in self.root.iterdir() if p.name.startswith("request-") and p.is_dir())
            for old in kept[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith("request-") and p.is_dir())

    def remove(self) -> None:
        """Delete the root and everything in it."""
        with self._lock:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(eq=False)
class LoadedPipeline:
    """A pipeline and the lock that every call on it holds."""

    name: str
    pipe: Any
    lock: threading.Lock


class PipelineCache:
    """The launch model (always kept) and, with model choice, the most recently used others, at most
    ``capacity`` in all. A pipeline dropped from the cache lives on for the requests still using it."""

    def __init__(
        self, model: str, device: str, capacity: int = MAX_LOADED, loader: Callable[..., Any] | None = None
    ) -> None:
        self.launch = _model_key(model)
        self.device = device
        self.capacity = max(1, capacity)
        self._loader = loader
        self._loaded: OrderedDict[str, LoadedPipeline] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def names(self) -> list[str]:
        with self._guard:
            return list(self._loaded)

    def _cached(self, key: str) -> LoadedPipeline | None:
        with self._guard:
            entry = self._loaded.get(key)
            if entry is not None:
                self._loaded.move_to_end(key)
            return entry

    def get(self, name: str | None = None) -> LoadedPipeline:
        """The loaded pipeline for ``name`` (None or blank: the launch model), loading it once if needed."""
        key = _model_key(name) if name is not None and name.strip() else self.launch
        entry = self._cached(key)
        if entry is not None:
            return entry
        with self._guard:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per model, however many requests ask for it at once
            try:
                entry = self._cached(key)
                if entry is not None:
                    return entry
                loader = self._loader
                if loader is None:
                    from .pipelines import load_pipeline as loader
                entry = LoadedPipeline(key, loader(key, device=self.device), threading.Lock())
                with self._guard:
                    self._loaded[key] = entry
                    others = [k for k in self._loaded if k != self.launch]  # least recently used first
                    for old in others[: max(0, len(self._loaded) - self.capacity)]:
                        del self._loaded[old]  # requests still running on it keep it alive
                return entry
            finally:
                with self._guard:
                    if self._loading.get(key) is loading:
                        del self._loading[key]


class AppHandlers:
    """What the page's buttons call (usable without a browser): validation, the pipeline's lock, the
    request's files, and one readable ``gr.Error`` for every failure."""

    def __init__(
        self,
        model: str = "shapes",
        device: str = "cpu",
        allow_model_choice: bool = False,
        keep: int = KEEP_REQUESTS,
        capacity: int = MAX_LOADED,
        loader: Callable[..., Any] | None = None,
    ) -> None:
        self.model = _model_key(model)
        self.display = _display_name(model)
        self.allow_model_choice = allow_model_choice
        self.pipelines = PipelineCache(model, device, capacity if allow_model_choice else 1, loader)
        self.folders = RequestFolders(keep)

    def _entry(self, model_name: Any) -> tuple[LoadedPipeline, str]:
        """(the pipeline to use, the model's name as the visitor may see it)."""
        chosen = _text(model_name, "model").strip() if self.allow_model_choice else ""
        if not chosen or chosen == self.display:
            try:
                return self.pipelines.get(None), self.display
            except Exception:
                log.exception("could not load the launch model %r", self.model)
                raise ConceptAttentionError(
                    "could not load this server's model; the server log has the details"
                ) from None
        if len(chosen) > NAME_MAX:
            raise ConceptAttentionError(f"model names have at most {NAME_MAX} characters")
        try:
            return self.pipelines.get(chosen), chosen
        except Exception:
            log.warning("a visitor's model %r did not load", chosen, exc_info=True)
            raise _AsWritten(f"could not load model {chosen!r}: give 'shapes' or a model this server has") from None

    def _run(self, what: str, work: Callable[[], Any]) -> Any:
        import gradio as gr

        try:
            return work()
        except gr.Error:
            raise
        except _AsWritten as err:
            raise gr.Error(str(err)) from None
        except ConceptAttentionError as err:
            raise gr.Error(_scrub(str(err))) from None
        except Exception as err:
            log.exception("ConceptAttention app: %s failed", what)
            raise gr.Error(f"internal error ({type(err).__name__}); the server log has the details") from None

    def _finish(self, result: Any, shown_name: str) -> tuple[Any, list, Any, str]:
        result.settings["model"] = shown_name  # result.json names no server path
        return _outputs(result, self.folders.new())

    def generate(
        self, prompt: Any, concepts: Any, steps: Any = 20, seed: Any = 0, model_name: Any = None
    ) -> tuple[Any, list, Any, str]:
        """Text -> (image, overlays, segmentation, zip path); errors are ``gr.Error``."""

        def work():
            text = _text(prompt, "the prompt")
            words = _words(concepts)
            n_steps = _integer(steps, "steps", 1, STEPS_MAX)
            n_seed = _integer(seed, "seed", 0, SEED_MAX)
            entry, shown = self._entry(model_name)
            with entry.lock:
                result = entry.pipe.generate(text, words, steps=n_steps, seed=n_seed)
            return self._finish(result, shown)

        return self._run("generate", work)

    def encode(
        self, image: Any, caption: Any, concepts: Any, t: Any = 0.5, samples: Any = 4, model_name: Any = None
    ) -> tuple[Any, list, Any, str]:
        """An image -> (image, overlays, segmentation, zip path); errors are ``gr.Error``."""

        def work():
            if image is None:
                raise ConceptAttentionError("upload an image first")
            text = _text(caption, "the caption")
            words = _words(concepts)
            level = _fraction(t, "t (the noise level)")
            n_samples = _integer(samples, "samples", 1, SAMPLES_MAX)
            entry, shown = self._entry(model_name)
            with entry.lock:
                result = entry.pipe.encode(image, words, caption=text, t=level, samples=n_samples)
            return self._finish(result, shown)

        return self._run("encode", work)

    def close(self) -> None:
        """Delete the request folders."""
        self.folders.remove()


def build_app(model: str = "shapes", device: str = "cpu", allow_model_choice: bool = False) -> Any:
    """The Gradio Blocks page (not launched); its handlers are ``page.handlers`` (an :class:`AppHandlers`).

    ``page.close()`` also deletes the app's request folders.
    """
    try:
        import gradio as gr
    except ImportError:
        raise ConceptAttentionError('the web page needs gradio: pip install "conceptattention[app]"') from None

    handlers = AppHandlers(model, device, allow_model_choice)

    with gr.Blocks(title="ConceptAttention", delete_cache=GRADIO_CACHE) as page:
        gr.Markdown(
            "# ConceptAttention\nWhere does each word live in the image? Maps from the diffusion "
            "transformer's own attention outputs (Helbling et al., ICML 2025). The built-in `shapes` "
            "model knows: circle square triangle, red green blue yellow, gray grass sky background."
        )
        shown = handlers.display.replace("`", "'")
        if allow_model_choice:
            model_box = gr.Textbox(
                value=handlers.display,
                label="model",
                elem_id="model",
                info=f"'shapes' or a model this server has (diffusers hub id or folder, "
                f"train-shapes folder); blank: the server's model, {shown}",
            )
        else:
            model_box = None
            gr.Markdown(f"model: `{shown}`", elem_id="model-name")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(value="a red circle and a blue square on grass", label="prompt", elem_id="prompt")
            gen_concepts = gr.Textbox(value="circle square grass", label="concepts", elem_id="gen-concepts")
            with gr.Row():
                steps = gr.Slider(1, 50, value=20, step=1, label="steps")
                seed = gr.Number(value=0, precision=None, step=1, label="seed", elem_id="seed")
            gen_button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Tab("Encode an image"):
            image_in = gr.Image(type="pil", label="image", elem_id="image-in")
            caption = gr.Textbox(value="", label="caption (optional)")
            enc_concepts = gr.Textbox(value="circle square grass", label="concepts", elem_id="enc-concepts")
            with gr.Row():
                t = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="noise level t")
                samples = gr.Slider(1, 8, value=4, step=1, label="noise samples")
            enc_button = gr.Button("Encode", variant="primary", elem_id="encode")
        with gr.Tab("Encode a video"):
            gr.Markdown("For video models: the maps play as videos below, one per concept.")
            video_in = gr.Video(label="video (mp4, webm, gif)", elem_id="video-in")
            video_caption = gr.Textbox(value="", label="caption (optional)")
            video_concepts = gr.Textbox(value="", label="concepts", elem_id="video-concepts")
            with gr.Row():
                video_t = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="noise level t")
                video_samples = gr.Slider(1, 8, value=2, step=1, label="noise samples")
            video_button = gr.Button("Encode the video", variant="primary", elem_id="encode-video")
        with gr.Row():
            image_out = gr.Image(label="image", elem_id="image-out")
            segmentation = gr.Image(label="segmentation (argmax over concepts)", elem_id="segmentation")
        overlays = gr.Gallery(label="one map per concept (videos play)", columns=4, elem_id="overlays")
        download = gr.File(label="maps.npy, maps_raw.npy, result.json and pictures (zip)", elem_id="download")
        outputs = [image_out, overlays, segmentation, download]
        if model_box is None:

            def run_generate(prompt, concepts, steps, seed):
                return handlers.generate(prompt, concepts, steps, seed)

            def run_encode(image, caption, concepts, t, samples):
                return handlers.encode(image, caption, concepts, t, samples)

            gen_inputs = [prompt, gen_concepts, steps, seed]
            enc_inputs = [image_in, caption, enc_concepts, t, samples]
            video_inputs = [video_in, video_caption, video_concepts, video_t, video_samples]
        else:

            def run_generate(model_name, prompt, concepts, steps, seed):
                return handlers.generate(prompt, concepts, steps, seed, model_name=model_name)

            def run_encode(model_name, image, caption, concepts, t, samples):
                return handlers.encode(image, caption, concepts, t, samples, model_name=model_name)

            gen_inputs = [model_box, prompt, gen_concepts, steps, seed]
            enc_inputs = [model_box, image_in, caption, enc_concepts, t, samples]
            video_inputs = [model_box, video_in, video_caption, video_concepts, video_t, video_samples]
        gen_button.click(run_generate, gen_inputs, outputs, api_name="generate", concurrency_limit=CONCURRENCY)
        enc_button.click(run_encode, enc_inputs, outputs, api_name="encode", concurrency_limit=CONCURRENCY)
        video_button.click(run_encode, video_inputs, outputs, api_name="encode_video", concurrency_limit=CONCURRENCY)

    page.handlers = handlers
    close_server = page.close

    def close(verbose: bool = True) -> None:
        try:
            close_server(verbose)
        finally:
            handlers.close()

    page.close = close
    return page


def launch(
    model: str = "shapes",
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
    *,
    allow_model_choice: bool = False,
) -> Any:
    """Build and serve the page; returns the Gradio app (non-blocking when ``block`` is False).

    The launch model is loaded before serving. ``allow_model_choice`` gives the page a model box
    (each visitor's own choice, loaded on demand).
    """
    page = build_app(model, device, allow_model_choice=allow_model_choice)
    try:
        page.handlers.pipelines.get(None)  # a bad launch model fails here, not in a visitor's request
    except BaseException as err:
        page.close()
        if isinstance(err, ConceptAttentionError) or not isinstance(err, Exception):
            raise
        raise ConceptAttentionError(f"could not load model {model!r}: {type(err).__name__}: {err}") from err
    try:
        page.queue(default_concurrency_limit=CONCURRENCY).launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=True
        )
    except BaseException:
        page.close()
        raise
    if block:  # served until Ctrl-C
        page.close()
    return page
