"""A web page to try ConceptAttention: a prompt (or an uploaded image) and concepts -> image, one
overlay per concept, the argmax segmentation, and the arrays to download.

Needs the optional extra: ``pip install "conceptattention[app]"``; start it with ``conceptattention app``.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .errors import ConceptAttentionError

_PIPELINES: dict[tuple[str, str], Any] = {}


def _pipeline(model: str, device: str) -> Any:
    from .pipelines import load_pipeline

    key = (model.strip() or "shapes", device)
    if key not in _PIPELINES:
        _PIPELINES.clear()  # one model in memory at a time
        _PIPELINES[key] = load_pipeline(key[0], device=device)
    return _PIPELINES[key]


def _words(text: str) -> list[str]:
    words = [w for w in text.replace(",", " ").split() if w]
    if not words:
        raise ConceptAttentionError("enter at least one concept word, e.g. 'circle square grass'")
    return words


def _outputs(result: Any) -> tuple[Any, list, Any, str]:
    """(image, [(overlay, concept)], segmentation, zip path) for the page."""
    from PIL import Image

    out = Path(tempfile.mkdtemp(prefix="conceptattention-"))
    written = result.save(out)
    overlays = [(Image.open(written[f"overlay:{c}"]), c) for c in result.concepts]
    archive = out / "conceptattention_maps.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for key in ("maps", "maps_raw", "result", "image", "segmentation", "grid"):
            if key in written:
                z.write(written[key], written[key].name)
    image = result.image
    if max(image.size) < 384:  # small images (the shapes model's 64 px) shown enlarged, pixels kept sharp
        scale = 384 // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image, overlays, Image.open(written["segmentation"]), str(archive)


def build_app(model: str = "shapes", device: str = "cpu") -> Any:
    """The Gradio Blocks page (not launched)."""
    try:
        import gradio as gr
    except ImportError:
        raise ConceptAttentionError('the web page needs gradio: pip install "conceptattention[app]"') from None

    def run_generate(model_name: str, prompt: str, concepts: str, steps: float, seed: float):
        try:
            pipe = _pipeline(model_name, device)
            result = pipe.generate(prompt, _words(concepts), steps=int(steps), seed=int(seed))
            return _outputs(result)
        except ConceptAttentionError as err:
            raise gr.Error(str(err)) from None

    def run_encode(model_name: str, image: Any, caption: str, concepts: str, t: float, samples: float):
        try:
            if image is None:
                raise ConceptAttentionError("upload an image first")
            pipe = _pipeline(model_name, device)
            result = pipe.encode(image, _words(concepts), caption=caption, t=float(t), samples=int(samples))
            return _outputs(result)
        except ConceptAttentionError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="ConceptAttention") as page:
        gr.Markdown("# ConceptAttention\nWhere does each word live in the image? Maps from the diffusion "
                    "transformer's own attention outputs (Helbling et al., ICML 2025). The built-in `shapes` "
                    "model knows: circle square triangle, red green blue yellow, gray grass sky background.")
        model_box = gr.Textbox(value=model, label="model", info="'shapes', a train-shapes folder, or a FLUX.1 / SD3 "
                               "diffusers id or folder", elem_id="model")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(value="a red circle and a blue square on grass", label="prompt", elem_id="prompt")
            gen_concepts = gr.Textbox(value="circle square grass", label="concepts", elem_id="gen-concepts")
            with gr.Row():
                steps = gr.Slider(1, 50, value=20, step=1, label="steps")
                seed = gr.Number(value=0, precision=0, label="seed")
            gen_button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Tab("Encode an image"):
            image_in = gr.Image(type="pil", label="image", elem_id="image-in")
            caption = gr.Textbox(value="", label="caption (optional)")
            enc_concepts = gr.Textbox(value="circle square grass", label="concepts", elem_id="enc-concepts")
            with gr.Row():
                t = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="noise level t")
                samples = gr.Slider(1, 8, value=4, step=1, label="noise samples")
            enc_button = gr.Button("Encode", variant="primary", elem_id="encode")
        with gr.Row():
            image_out = gr.Image(label="image", elem_id="image-out")
            segmentation = gr.Image(label="segmentation (argmax over concepts)", elem_id="segmentation")
        overlays = gr.Gallery(label="one map per concept", columns=4, elem_id="overlays")
        download = gr.File(label="maps.npy, maps_raw.npy, result.json and pictures (zip)", elem_id="download")
        outputs = [image_out, overlays, segmentation, download]
        gen_button.click(run_generate, [model_box, prompt, gen_concepts, steps, seed], outputs)
        enc_button.click(run_encode, [model_box, image_in, caption, enc_concepts, t, samples], outputs)
    return page


def launch(model: str = "shapes", device: str = "cpu", host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, block: bool = True) -> Any:
    """Build and serve the page; returns the Gradio app (non-blocking when ``block`` is False)."""
    page = build_app(model, device)
    page.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=True)
    return page
