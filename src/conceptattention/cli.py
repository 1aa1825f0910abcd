"""Command line: ``conceptattention generate | encode | eval | train-shapes | shapes-benchmark | app``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import ConceptAttentionError
from .pipelines import is_shapes_model
from .pipelines.shapes import ShapesPipeline

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "ConceptAttention saliency maps for diffusion transformers: where each word of a prompt lives in an "
        "image. The built-in 'shapes' model works offline on a CPU; FLUX.1 and SD3/SD3.5 via --model.\n\n"
        "Examples:\n\n"
        "  conceptattention generate \"a red circle and a blue square on grass\" -c circle square grass -o runs/demo\n\n"
        "  conceptattention encode photo.png -c circle grass --caption \"a red circle on grass\" -o runs/enc\n\n"
        "  conceptattention eval --dataset shapes --method all -o runs/eval\n\n"
        "  conceptattention app"
    ),
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"conceptattention {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """ConceptAttention saliency maps for diffusion transformers."""

MODEL_HELP = ("'shapes' (built in, offline), a directory written by train-shapes, or a FLUX.1 / SD3 / SD3.5 "
              "diffusers model: hub id or local directory")
DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _load(model: str, device: str, dtype: str, offload: str | None):
    import torch

    from .pipelines import load_pipeline

    if dtype not in DTYPES:
        raise ConceptAttentionError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_dtype = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    return load_pipeline(model, device=device, torch_dtype=torch_dtype, offload=offload)


def _real_model_options(pipe, **options):
    """Options that only diffusers models take; a clear error if given for the shapes model."""
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(pipe, ShapesPipeline) and given:
        raise ConceptAttentionError(
            f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply to FLUX.1 / SD3 models; "
            "the shapes model works at 64x64"
        )
    return given
LAYERS_HELP = "double-stream blocks to read, e.g. --layers 2 --layers 3 (default: the model's)"


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=2)


def _concepts(concepts: List[str]) -> List[str]:
    words = [w for c in concepts for w in c.replace(",", " ").split()]
    if not words:
        raise ConceptAttentionError("no concepts given: pass --concepts WORD [WORD ...]")
    return words


def _parse_size(size: str | None) -> tuple[int, int] | None:
    """'1024x768' -> (1024, 768)."""
    if size is None:
        return None
    try:
        parsed = tuple(int(v) for v in size.lower().split("x"))
    except ValueError:
        parsed = ()
    if len(parsed) != 2 or min(parsed) < 1:
        raise ConceptAttentionError(f"--size must look like 1024x768, not {size!r}")
    return parsed


def _report(result, out: Path, quiet: bool) -> None:
    written = result.save(out)
    if not quiet:
        typer.echo(f"wrote {len(written)} files to {out} (maps.npy {list(result.maps.shape)}, grid.png, result.json)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def generate(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="what to draw, e.g. 'a red circle and a blue square on grass'"),
    concepts: List[str] = typer.Option(..., "--concepts", "-c", help="concept words (several after one flag)"),
    out: Path = typer.Option(Path("runs/generate"), "--out", "-o", help="output directory"),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the model's; shapes 20)"),
    guidance: Optional[float] = typer.Option(None, help="guidance scale (default: the model's)"),
    shift: Optional[float] = typer.Option(None, help="timestep shift of the shapes model's sampler (default: "
                                          "the model's; FLUX.1 / SD3 use their scheduler's)"),
    seed: int = typer.Option(0),
    layers: Optional[List[int]] = typer.Option(None, "--layers", help=LAYERS_HELP),
    height: Optional[int] = typer.Option(None, help="image height (FLUX.1 / SD3 only)"),
    width: Optional[int] = typer.Option(None, help="image width (FLUX.1 / SD3 only)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16"),
    offload: Optional[str] = typer.Option(None, help="'model' or 'sequential' CPU offload (FLUX.1 / SD3)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Generate an image from PROMPT and one saliency map per concept.

    Writes image.png, maps.npy, maps_raw.npy, <concept>.png overlays, grid.png, segmentation.png and
    result.json into --out.

    Examples:\n
      conceptattention generate "a red circle and a blue square on grass" -c circle square grass -o runs/demo\n
      conceptattention generate "a dog next to a tree" -c dog tree sky --model black-forest-labs/FLUX.1-schnell
      --steps 4 --guidance 0 --device cuda --dtype bfloat16 -o runs/flux
    """
    try:
        words = _concepts(list(concepts) + list(ctx.args))
        if shift is not None and not is_shapes_model(model):  # before loading a model of many GB
            raise ConceptAttentionError("--shift sets the shapes model's sampler; FLUX.1 and SD3 use the shift of "
                                        "their own scheduler (set it on the diffusers pipeline in Python)")
        pipe = _load(model, device, dtype, offload)
        extra = _real_model_options(pipe, height=height, width=width)
        extra.update({k: v for k, v in (("steps", steps), ("guidance", guidance), ("shift", shift)) if v is not None})
        if not isinstance(pipe, ShapesPipeline):
            extra["progress"] = not quiet
        result = pipe.generate(prompt, words, seed=seed, layers=layers, **extra)
        _report(result, out, quiet)
    except ConceptAttentionError as err:
        _fail(err)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def encode(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="image file (any size or mode; resized to the model's)"),
    concepts: List[str] = typer.Option(..., "--concepts", "-c", help="concept words (several after one flag)"),
    caption: str = typer.Option("", help="caption of the image (the paper uses 'a {class}')"),
    out: Path = typer.Option(Path("runs/encode"), "--out", "-o", help="output directory"),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    t: float = typer.Option(0.5, help="noise level of the single pass, in [0, 1]"),
    samples: int = typer.Option(4, help="noise samples averaged (batched in one pass)"),
    seed: int = typer.Option(0),
    layers: Optional[List[int]] = typer.Option(None, "--layers", help=LAYERS_HELP),
    size: Optional[str] = typer.Option(None, help="WIDTHxHEIGHT fed to the model (FLUX.1 / SD3 only)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16"),
    offload: Optional[str] = typer.Option(None, help="'model' or 'sequential' CPU offload (FLUX.1 / SD3)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Saliency maps of the concepts in a real IMAGE (noise at t, several noise draws, one early-stopped pass).

    Examples:\n
      conceptattention encode runs/demo/image.png -c circle square grass --caption "a red circle on grass" -o runs/enc\n
      conceptattention encode dog.jpg -c dog grass sky background --caption "a dog"
      --model stabilityai/stable-diffusion-3.5-medium --device cuda --dtype bfloat16 -o runs/sd35
    """
    try:
        words = _concepts(list(concepts) + list(ctx.args))
        pipe = _load(model, device, dtype, offload)
        extra = _real_model_options(pipe, size=_parse_size(size))
        result = pipe.encode(image, words, caption=caption, t=t, samples=samples, seed=seed, layers=layers, **extra)
        _report(result, out, quiet)
    except ConceptAttentionError as err:
        _fail(err)


@app.command("train-shapes")
def train_shapes(
    out: Path = typer.Option(..., "--out", "-o", help="run directory (checkpoint, log, exported weights)"),
    steps: int = typer.Option(None, help="total steps (default: the shipped model's)"),
    batch: int = typer.Option(None, help="batch size (default: the shipped model's)"),
    seed: int = typer.Option(0, help="data/noise seed (use a new one when continuing from weights)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default: the shipped model's)"),
    warmup: Optional[int] = typer.Option(None, help="warm-up steps (default: the shipped model's)"),
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="continue from existing weights: 'shapes' (shipped) or a weights directory"),
    object_weight: Optional[float] = typer.Option(None, help="loss weight of object pixels (background 1)"),
    t_uniform: Optional[float] = typer.Option(None, help="share of timesteps drawn uniformly (default 0)"),
    colorless_rate: Optional[float] = typer.Option(
        None, help="share of captions that name the shapes without their colours, so shape words must be read "
        "(default 0)"),
    multi_object_rate: Optional[float] = typer.Option(
        None, help="share of each batch asking for two or three objects, where shape and colour words must be bound "
        "to the right object (default 0: the world's own mix, 60% single objects)"),
    text_positions: bool = typer.Option(
        False, "--text-positions", help="give prompt tokens RoPE positions in word order (Flux passes zeros), so the "
        "transformer can bind a word to its neighbour by relative position; from scratch or --init-from weights"),
    text_neighbours: bool = typer.Option(
        False, "--text-neighbours", help="let each prompt token add learned maps of the words just before and after "
        "it, so 'circle' in 'a red circle' carries its colour (starting at zero; concepts encoded alone are "
        "unaffected); from scratch or --init-from weights"),
    drop_next_word: bool = typer.Option(
        False, "--drop-next-word", help="keep only the map of the word before each prompt token (adding the maps "
        "if the model has none): 'circle' carries its colour, 'red' no longer its shape, so image tokens must read "
        "their shape word; from scratch or --init-from weights"),
    reader_weight: Optional[float] = typer.Option(
        None, help="weight of a reading objective: in captions that name no colour (--colorless-rate, single "
        "words), each shape word's token must name its object's colour from the image, so shape words learn to "
        "find their objects (a linear head on the text stream, not exported; default 0: off)"),
    reader_block: Optional[List[int]] = typer.Option(
        None, help="a double-stream block whose text output the reading objective reads; repeat for several "
        "(e.g. --reader-block 3 --reader-block 4 --reader-block 5: one head each, their cross-entropies averaged; "
        "-1 = the last; default: the last)"),
    reader_at: Optional[str] = typer.Option(
        None, help="what the reading objective reads at its blocks: 'block' (the text stream as the block leaves it, "
        "the default) or 'attention' (the text tokens' attention outputs before the output projection: for a "
        "concept, the very vector ConceptAttention compares with the image tokens')"),
    concept_weight: Optional[float] = typer.Option(
        None, help="weight of an image-label objective on the maps: at every image token, the concept words true of "
        "the image (which words, never where) must hold ConceptAttention's softmax over all the world's concepts, "
        "so that absent words take no pixels (default 0: off)"),
    coreference_weight: Optional[float] = typer.Option(
        None, help="weight of a co-reference objective on the maps: words that name the same pixels by what the "
        "caption says (an object's colour and shape word, the scene's name and 'background') must score every image "
        "token alike, so neither takes all of the softmax (default 0: off)"),
    concept_block: Optional[List[int]] = typer.Option(
        None, help="a double-stream block whose maps the image-label and co-reference objectives score; repeat for "
        "several (default: the model's map layers)"),
    prediction: Optional[str] = typer.Option(
        None, help="what the transformer outputs: 'velocity' (as in Flux) or 'sample' (the clean image); with "
        "--init-from a change retrains the output head (default: the weights' own, velocity from scratch)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    precision: str = typer.Option(
        "auto", help="bf16 (autocast), fp32 (TF32 matrix products on CUDA) or auto: bf16 on CPU, fp32 on CUDA"),
    max_seconds: Optional[float] = typer.Option(None, help="stop (with a checkpoint) after this long"),
    stop_after: Optional[int] = typer.Option(
        None, help="stop (with a checkpoint and exported weights) after this many steps, keeping the learning-rate "
        "schedule of --steps: what --max-seconds does, but the same on every machine"),
    patch: Optional[int] = typer.Option(
        None, help="pixels per patch side (default 8; 4 -> 256 tokens); with --init-from, re-patches those weights "
        "to this size, keeping every block"),
    layers: Optional[int] = typer.Option(None, help="from scratch: double-stream blocks (default 6)"),
    single_layers: Optional[int] = typer.Option(None, help="from scratch: single-stream blocks (default 2)"),
    heads: Optional[int] = typer.Option(None, help="from scratch: attention heads (default 6)"),
    head_dim: Optional[int] = typer.Option(None, help="from scratch: width of a head (default 32)"),
    text_layers: Optional[int] = typer.Option(
        None, help="transformer layers of the text encoder (default 2; 0: no word mixing, each prompt token is its "
        "word plus its position); with --init-from only 0, which drops those weights' mixing layers"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train the shapes model from scratch, or resume OUT/checkpoint.pt. Ctrl-C checkpoints and stops."""
    from dataclasses import replace

    from .shapes.train import TrainConfig, train, use_bf16

    try:
        cfg = TrainConfig(seed=seed, bf16=use_bf16(precision, device))
    except ConceptAttentionError as err:
        _fail(err)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    for name, value in (("batch", batch), ("lr", lr), ("warmup", warmup), ("init_from", init_from),
                        ("object_weight", object_weight), ("t_uniform", t_uniform), ("prediction", prediction),
                        ("colorless_rate", colorless_rate), ("multi_object_rate", multi_object_rate),
                        ("reader_weight", reader_weight), ("concept_weight", concept_weight),
                        ("coreference_weight", coreference_weight)):
        if value is not None:
            cfg = replace(cfg, **{name: value})
    for name, value in (("--t-uniform", t_uniform), ("--colorless-rate", colorless_rate),
                        ("--multi-object-rate", multi_object_rate)):
        if value is not None and not 0.0 <= value <= 1.0:
            _fail(ConceptAttentionError(f"{name} is a share of the batch, between 0 and 1, not {value}"))
    for name, value in (("--reader-weight", reader_weight), ("--concept-weight", concept_weight),
                        ("--coreference-weight", coreference_weight)):
        if value is not None and value < 0:
            _fail(ConceptAttentionError(f"{name} is a loss weight, 0 or more, not {value}"))
    if concept_block:
        if cfg.concept_weight <= 0 and cfg.coreference_weight <= 0:
            _fail(ConceptAttentionError("--concept-block says which maps the objectives on the maps score; give it a "
                                        "--concept-weight or --coreference-weight above 0 too"))
        cfg = replace(cfg, concept_blocks=tuple(concept_block))
    for option, what, field, value in (("--reader-block", "where", "reader_blocks", tuple(reader_block or ())),
                                       ("--reader-at", "what", "reader_at", reader_at)):
        if value:
            if cfg.reader_weight <= 0:
                _fail(ConceptAttentionError(f"{option} says {what} the reading objective reads; give it a "
                                            "--reader-weight above 0 too"))
            cfg = replace(cfg, **{field: value})
    shape = {"patch": patch, "layers": layers, "single_layers": single_layers, "heads": heads, "head_dim": head_dim,
             "text_layers": text_layers}
    resuming = (Path(out) / "checkpoint.pt").is_file()
    if cfg.init_from and not resuming and patch is not None:  # re-patch the weights, not a new architecture
        cfg, shape["patch"] = replace(cfg, patch=patch), None
    if cfg.init_from and not resuming and text_layers is not None:  # drop the weights' mixing layers
        if text_layers != 0:
            _fail(ConceptAttentionError(
                f"--text-layers {text_layers} cannot be given to --init-from weights: their text encoder's layers can "
                "only be dropped (--text-layers 0); a new layer count needs a model from scratch"))
        cfg, shape["text_layers"] = replace(cfg, drop_text_mixing=True), None
    given = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None]
    if text_positions and resuming:
        _fail(ConceptAttentionError(
            f"{out} holds a checkpoint, which keeps its own text positions; drop --text-positions or use a new --out"))
    if text_neighbours and resuming:
        _fail(ConceptAttentionError(
            f"{out} holds a checkpoint, which keeps its own text encoder; drop --text-neighbours or use a new --out"))
    if drop_next_word and resuming:
        _fail(ConceptAttentionError(
            f"{out} holds a checkpoint, which keeps its own text encoder; drop --drop-next-word or use a new --out"))
    cfg = replace(cfg, text_positions=text_positions, text_neighbours=text_neighbours, drop_next_word=drop_next_word)
    if prediction is not None and resuming:
        _fail(ConceptAttentionError(
            f"{out} holds a checkpoint, whose weights fix what the model predicts; drop --prediction or use a new --out"))
    if prediction is not None and prediction not in ("velocity", "sample"):
        _fail(ConceptAttentionError(f"--prediction must be 'velocity' or 'sample', not {prediction!r}"))
    if given and (cfg.init_from or resuming):
        _fail(ConceptAttentionError(
            f"{', '.join(given)} set the architecture of a model trained from scratch; a run that resumes a checkpoint "
            "keeps its architecture, and one that starts from --init-from keeps that of its weights (only --patch may "
            "re-patch them and --text-layers 0 drop their word mixing; drop the option or use a new --out)"))
    try:
        from .shapes.model import architecture

        model_cfg = architecture(**shape)
    except ConceptAttentionError as err:
        _fail(err)
    try:
        weights = train(out, cfg, model_cfg, device=device, progress=not quiet, max_seconds=max_seconds,
                        stop_after=stop_after)
    except ConceptAttentionError as err:  # e.g. a --patch that does not divide the --init-from weights' patch
        _fail(err)
    typer.echo(f"weights: {weights}")


@app.command("shapes-benchmark")
def shapes_benchmark(
    out: Path = typer.Option(Path("runs/shapes-benchmark"), "--out", "-o"),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    images: int = typer.Option(500, help="held-out images for the map metrics"),
    sample_images: int = typer.Option(500, help="held-out captions generated and scored (0: skip)"),
    guidance: Optional[float] = typer.Option(None, help="default: the model's"),
    shift: Optional[float] = typer.Option(None, help="sampler timestep shift (default: the model's)"),
    device: str = typer.Option("cpu"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Held-out report of the shapes model: sample quality and every readout's map quality."""
    from .pipelines import load_pipeline
    from .shapes import benchmark

    try:
        pipe = load_pipeline(model, device=device)
        if not isinstance(pipe, ShapesPipeline):
            raise ConceptAttentionError("shapes-benchmark measures a shapes model; pass 'shapes' or a train-shapes directory")
        benchmark.run(pipe, out, images=images, sample_images=sample_images, guidance=guidance, shift=shift,
                      progress=not quiet)
    except ConceptAttentionError as err:
        _fail(err)
    typer.echo((out / "shapes_benchmark.md").read_text())


@app.command("eval")
def eval_command(
    dataset: str = typer.Option("shapes", "--dataset", "-d", help="shapes, imagenet-seg, voc-single or voc-multi"),
    method: List[str] = typer.Option(["all"], "--method", "-m",
                                     help="'all', or method names (repeat the flag or separate by commas)"),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    data: Optional[Path] = typer.Option(None, help="gtsegs_ijcv.mat (imagenet-seg) or the VOCdevkit folder (voc-*)"),
    class_map: Optional[Path] = typer.Option(None, help="JSON: WordNet id or lemma -> concept word (imagenet-seg)"),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="run folder: records (resumable), results.json/.md"),
    limit: Optional[int] = typer.Option(None, help="only the first N images"),
    images: int = typer.Option(500, help="shapes: held-out images generated"),
    t: Optional[float] = typer.Option(None, help="noise level (default 0.5)"),
    samples: Optional[int] = typer.Option(None, help="noise draws per image (default: shapes 4, real models 5)"),
    seed: Optional[int] = typer.Option(None, help="noise seed (image i uses seed + 1000 i)"),
    layers: Optional[List[int]] = typer.Option(None, "--layers", help=LAYERS_HELP),
    batch: Optional[int] = typer.Option(None, help="images per pass (default: shapes 50, real models 1)"),
    blur: Optional[float] = typer.Option(None, help="sigma of the 3x3 Gaussian blur of token maps (0: none; "
                                                    "default: 1 on real datasets, as the paper)"),
    upsample: Optional[str] = typer.Option(None, help="nearest or bilinear upsampling of maps to the labels"),
    concept_tokens: Optional[str] = typer.Option(None, help="FLUX.1 / SD3: 'first' (paper) or 'mean' of a word's tokens"),
    size: Optional[str] = typer.Option(None, help="FLUX.1 / SD3: WIDTHxHEIGHT fed to the model (default: the "
                                                  "model's resolution on the longer side)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Zero-shot segmentation benchmark: methods x dataset -> results.json and a Markdown table.

    Resumable (rerun the same command), and shardable: e.g.
    `accelerate launch --multi_gpu --num_processes 2 -m conceptattention eval ...`.

    Examples:\n
      conceptattention eval --dataset shapes --method all --out runs/eval-shapes\n
      conceptattention eval --dataset voc-single --data VOCdevkit --model black-forest-labs/FLUX.1-schnell
      --device cuda --dtype bfloat16 --method concept_attention,cross_attention --out runs/voc
    """
    from .eval.datasets import load_dataset
    from .eval.methods import resolve_methods
    from .eval.runner import TABLE_FILE, distributed_rank, evaluate

    try:
        resolve_methods(list(method))  # a typo fails before any loading
        rank, _ = distributed_rank()
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process under a launcher
        bench = load_dataset(dataset, data, images=images, class_map=class_map)
        pipe = _load(model, device, dtype, None)
        extra = _real_model_options(pipe, concept_tokens=concept_tokens, size=_parse_size(size))
        results = evaluate(pipe, bench, list(method), out, limit=limit, progress=not quiet, t=t, samples=samples,
                           seed=seed, layers=layers or None, batch=batch, blur=blur, upsample=upsample, **extra)
    except ConceptAttentionError as err:
        _fail(err)
    if results is not None and not quiet and rank == 0:
        typer.echo((out / TABLE_FILE).read_text())


@app.command("app")
def app_command(
    model: str = typer.Option("shapes", help=MODEL_HELP),
    device: str = typer.Option("cpu"),
    host: str = typer.Option("127.0.0.1", help="0.0.0.0 to serve other machines"),
    port: int = typer.Option(7860),
    share: bool = typer.Option(False, help="a temporary public gradio.live link"),
) -> None:
    """A web page to try prompts and images (needs: pip install "conceptattention[app]")."""
    from .app import launch

    try:
        typer.echo(f"serving on http://{host}:{port}  (Ctrl-C stops)")
        launch(model, device, host, port, share)
    except ConceptAttentionError as err:
        _fail(err)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
