"""Command line: ``conceptattention generate | encode | eval | train-shapes | shapes-benchmark | app``.

Parsing is strict (an unknown option or a stray argument is an error; ``-c`` takes every word up to
the next option), every number is checked, and every error a user can cause is one ``error:`` line
with exit status 2. Library warnings are hidden unless ``--verbose``. Nothing heavy is imported
until a command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer vendors its own click since 0.2x; its exceptions are the ones raised
    from typer._click import exceptions as cli_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as cli_errors  # type: ignore[no-redef]

from .errors import ConceptAttentionError

#: Options that take every following word up to the next option: ``-c circle square grass``.
GREEDY_OPTIONS = ("-c", "--concepts")
#: An error line longer than this is cut in the middle.
MAX_ERROR_CHARS = 400

_VERBOSE = False
_ABORTS = tuple({typer.Abort, getattr(cli_errors, "Abort", typer.Abort)})


def _one_line(message: str) -> str:
    text = " ".join(str(message).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 120] + " [...] " + text[-110:]
    return text


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def expand_greedy(args: List[str]) -> List[str]:
    """``-c a b c`` -> ``-c a -c b -c c``: a greedy option takes every word up to the next option (or ``--``)."""
    out: List[str] = []
    greedy = False
    for i, arg in enumerate(args):
        if arg == "--":
            out.extend(args[i:])
            break
        if arg.startswith("-") and arg != "-":
            greedy = arg in GREEDY_OPTIONS or arg.split("=", 1)[0] in GREEDY_OPTIONS[1:]
            if greedy and "=" in arg:
                flag, value = arg.split("=", 1)
                out += [flag, value]
                continue
            out.append(arg)
            if greedy:
                greedy = "first"
            continue
        if greedy == "first":
            out.append(arg)
            greedy = True
        elif greedy:
            out += [GREEDY_OPTIONS[1], arg]
        else:
            out.append(arg)
    return out


class _Command(TyperCommand):
    """A command whose ``-c`` is greedy (see :func:`expand_greedy`)."""

    def parse_args(self, ctx: Any, args: List[str]) -> List[str]:
        return super().parse_args(ctx, expand_greedy(list(args)))


class _Group(TyperGroup):
    """Runs a command; turns every user error into one ``error:`` line and exit status 2."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        global _VERBOSE
        _VERBOSE = False
        args = list(sys.argv[1:] if args is None else args)
        previous = signal.signal(signal.SIGTERM, _interrupt) if _in_main_thread() else None  # `kill` = Ctrl-C
        try:
            with warnings.catch_warnings():  # what _quiet_libraries hides is hidden for this command only
                code = self._run(args, prog_name, complete_var, **extra)
        finally:
            logging.disable(logging.NOTSET)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(code)

    def _run(self, args: List[str], prog_name: Any, complete_var: Any, **extra: Any) -> int:
        """The command's exit status; every error a user can cause is printed as one line first."""
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except cli_errors.NoArgsIsHelpError as err:
            typer.echo(err.ctx.get_help())
            code = 0
        except cli_errors.UsageError as err:
            _fail(_usage_message(err, args))
        except cli_errors.ClickException as err:
            _fail(err.format_message())
        except ConceptAttentionError as err:
            _fail(str(err))
        except (*_ABORTS, KeyboardInterrupt):
            code = 130
        except MemoryError:
            _fail("out of memory: use fewer concepts, a smaller image size or fewer noise samples")
        except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback for users
            if _VERBOSE:
                raise
            if _is_oom(err):
                _fail("the device ran out of memory: use fewer concepts, a smaller --size, fewer --samples, "
                      "--dtype bfloat16 or --offload model")
            _fail(f"internal error ({type(err).__name__}: {err}); rerun with --verbose for the traceback, and "
                  "please report it", code=1)
        if code == 130:  # Ctrl-C or `kill`: typer turns the KeyboardInterrupt into this status
            typer.echo("interrupted (nothing half-written was left)", err=True)
        return code if isinstance(code, int) else 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _is_oom(err: Exception) -> bool:
    """Whether ``err`` is a device out-of-memory error."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(err, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(err).lower()


def _usage_message(err: cli_errors.UsageError, args: List[str]) -> str:
    message = err.format_message().rstrip(".")
    command = err.ctx.command_path if err.ctx is not None else "conceptattention"
    if isinstance(err, cli_errors.MissingParameter) and any(a in GREEDY_OPTIONS for a in args):
        message += " (the words after -c are all concepts: put the prompt or image before -c, or end the concepts with --)"
    elif "unexpected extra argument" in message:
        message += " (quote a prompt of several words; -c takes the concept words)"
    return f"{message}; see '{command} --help'"


def _quiet_libraries(verbose: bool) -> None:
    """Hide library warnings and log lines (accelerate, diffusers, transformers) unless ``verbose``."""
    global _VERBOSE
    _VERBOSE = verbose
    if verbose:
        return
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the libraries log through the standard logging module


def finite(min: Optional[float] = None, max: Optional[float] = None, min_open: bool = False) -> Any:
    """A parser for a float option that must be finite (no nan or inf) and in range."""

    def parse(value: Any) -> Optional[float]:
        if value is None or isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except ValueError:
                raise typer.BadParameter(f"{value!r} is not a number") from None
        if number is None:
            return None
        if not math.isfinite(number):
            raise typer.BadParameter(f"{value!r} is not a finite number")
        if min is not None and (number < min or (min_open and number == min)):
            raise typer.BadParameter(f"{number:g} is {'not above' if min_open else 'below'} {min:g}")
        if max is not None and number > max:
            raise typer.BadParameter(f"{number:g} is above {max:g}")
        return number

    return parse


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help=(
        "ConceptAttention saliency maps for diffusion transformers: where each word of a prompt lives in an "
        "image. The built-in 'shapes' model works offline on a CPU; FLUX.1 and SD3/SD3.5 via --model.\n\n"
        "\b\nExamples:\n"
        "  conceptattention generate \"a red circle and a blue square on grass\" -c circle square grass -o runs/demo\n"
        "  conceptattention encode photo.png -c circle grass --caption \"a red circle on grass\" -o runs/enc\n"
        "  conceptattention eval --dataset shapes --method all -o runs/eval\n"
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
DTYPE_HELP = "auto, float32, bfloat16 or float16"
LAYERS_HELP = "double-stream blocks to read, e.g. --layers 2 --layers 3 (default: the model's)"
VERBOSE_HELP = "show library warnings, and the traceback of an unexpected error"
SEED_MAX = 2**63 - 1
COMMAND = {"cls": _Command}


def _device(device: str) -> str:
    from .pipelines.options import check_device

    check_device(device)
    return device


def _dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ConceptAttentionError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if DTYPES[dtype] is None:
        return None
    import torch

    return getattr(torch, DTYPES[dtype])


def _load(model: str, device: str, dtype: str, offload: Optional[str]) -> Any:
    from .pipelines import load_pipeline

    if offload not in (None, "model", "sequential"):
        raise ConceptAttentionError(f"--offload must be 'model' or 'sequential', not {offload!r}")
    return load_pipeline(model, device=_device(device), torch_dtype=_dtype(dtype), offload=offload)


def _is_shapes(pipe: Any) -> bool:
    from .pipelines.shapes import ShapesPipeline

    return isinstance(pipe, ShapesPipeline)


def _real_model_options(pipe: Any, **options: Any) -> dict:
    """Options that only diffusers models take; a clear error if given for the shapes model."""
    given = {k: v for k, v in options.items() if v is not None}
    if _is_shapes(pipe) and given:
        raise ConceptAttentionError(
            f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply to FLUX.1 / SD3 models; "
            "the shapes model works at 64x64"
        )
    return given


def _concepts(concepts: List[str]) -> List[str]:
    from .pipelines.options import concept_words

    return concept_words(concepts)


def _parse_size(size: Optional[str]) -> Optional[tuple[int, int]]:
    """'1024x768' -> (1024, 768)."""
    if size is None:
        return None
    try:
        parsed = tuple(int(v) for v in size.lower().split("x"))
    except ValueError:
        parsed = ()
    if len(parsed) != 2 or min(parsed) < 1 or max(parsed) > 16384:
        raise ConceptAttentionError(f"--size must look like 1024x768 (each side 1 to 16384), not {size!r}")
    return parsed  # type: ignore[return-value]


def _check_out(out: Path) -> Path:
    from .pipelines.result import check_out_dir

    return check_out_dir(out)


def _report(result: Any, out: Path, quiet: bool) -> None:
    written = result.save(out)
    if not quiet:
        typer.echo(f"wrote {len(written)} files to {out} (maps.npy {list(result.maps.shape)}, grid.png, result.json)")


OUT_HELP = ("output folder: new, empty, or holding an earlier result, which is replaced whole once the new one is "
            "complete (a folder holding other files is refused)")


@app.command(**COMMAND)
def generate(
    prompt: str = typer.Argument(..., help="what to draw, e.g. 'a red circle and a blue square on grass'"),
    concepts: List[str] = typer.Option(..., "--concepts", "-c", help="concept words: every word after -c up to the "
                                       "next option"),
    out: Path = typer.Option(Path("runs/generate"), "--out", "-o", help=OUT_HELP),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    steps: Optional[int] = typer.Option(None, min=1, max=1000, help="denoising steps (default: the model's; shapes 20)"),
    guidance: Optional[float] = typer.Option(None, parser=finite(min=0),
                                             help="guidance scale (default: the model's)"),
    shift: Optional[float] = typer.Option(None, parser=finite(min=0, min_open=True),
                                          help="timestep shift of the shapes model's sampler (default: the model's; "
                                          "FLUX.1 / SD3 use their scheduler's)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    layers: Optional[List[int]] = typer.Option(None, "--layers", help=LAYERS_HELP),
    height: Optional[int] = typer.Option(None, min=16, max=16384, help="image height (FLUX.1 / SD3 only)"),
    width: Optional[int] = typer.Option(None, min=16, max=16384, help="image width (FLUX.1 / SD3 only)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    offload: Optional[str] = typer.Option(None, help="'model' or 'sequential' CPU offload (FLUX.1 / SD3)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Generate an image from PROMPT and one saliency map per concept.

    Writes image.png, maps.npy, maps_raw.npy, <concept>.png overlays, grid.png, segmentation.png and
    result.json into --out.

    \b
    Examples:
      conceptattention generate "a red circle and a blue square on grass" -c circle square grass -o runs/demo
      conceptattention generate "a dog next to a tree" -c dog tree sky --model black-forest-labs/FLUX.1-schnell \\
          --steps 4 --guidance 0 --device cuda --dtype bfloat16 -o runs/flux
    """
    _quiet_libraries(verbose)
    from .pipelines import is_shapes_model

    words = _concepts(concepts)
    if shift is not None and not is_shapes_model(model):  # before loading a model of many GB
        raise ConceptAttentionError("--shift sets the shapes model's sampler; FLUX.1 and SD3 use the shift of "
                                    "their own scheduler (set it on the diffusers pipeline in Python)")
    out = _check_out(out)
    pipe = _load(model, device, dtype, offload)
    extra = _real_model_options(pipe, height=height, width=width)
    extra.update({k: v for k, v in (("steps", steps), ("guidance", guidance), ("shift", shift)) if v is not None})
    if not _is_shapes(pipe):
        extra["progress"] = not quiet
    result = pipe.generate(prompt, words, seed=seed, layers=layers, **extra)
    _report(result, out, quiet)


@app.command(**COMMAND)
def encode(
    image: Path = typer.Argument(..., help="image file (any size or mode; fitted to the model's input)"),
    concepts: List[str] = typer.Option(..., "--concepts", "-c", help="concept words: every word after -c up to the "
                                       "next option"),
    caption: str = typer.Option("", help="caption of the image (the paper uses 'a {class}')"),
    out: Path = typer.Option(Path("runs/encode"), "--out", "-o", help=OUT_HELP),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    t: float = typer.Option(0.5, parser=finite(min=0, max=1), help="noise level of the single pass, in [0, 1]"),
    samples: int = typer.Option(4, min=1, max=256, help="noise samples averaged (batched in one pass)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    layers: Optional[List[int]] = typer.Option(None, "--layers", help=LAYERS_HELP),
    size: Optional[str] = typer.Option(None, help="WIDTHxHEIGHT fed to the model (FLUX.1 / SD3 only)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    offload: Optional[str] = typer.Option(None, help="'model' or 'sequential' CPU offload (FLUX.1 / SD3)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Saliency maps of the concepts in a real IMAGE (noise at t, several noise draws, one early-stopped pass).

    \b
    Examples:
      conceptattention encode runs/demo/image.png -c circle square grass --caption "a red circle on grass" -o runs/enc
      conceptattention encode dog.jpg -c dog grass sky background --caption "a dog" \\
          --model stabilityai/stable-diffusion-3.5-medium --device cuda --dtype bfloat16 -o runs/sd35
    """
    _quiet_libraries(verbose)
    from .pipelines import open_image

    words = _concepts(concepts)
    parsed_size = _parse_size(size)
    out = _check_out(out)
    picture = open_image(image)  # an unreadable image fails before the model loads
    pipe = _load(model, device, dtype, offload)
    extra = _real_model_options(pipe, size=parsed_size)
    result = pipe.encode(picture, words, caption=caption, t=t, samples=samples, seed=seed, layers=layers, **extra)
    _report(result, out, quiet)


@app.command("train-shapes", **COMMAND)
def train_shapes(
    out: Path = typer.Option(..., "--out", "-o", help="run directory (checkpoint, log, exported weights)"),
    steps: Optional[int] = typer.Option(None, min=1, help="total steps (default: the shipped model's)"),
    batch: Optional[int] = typer.Option(None, min=1, help="batch size (default: the shipped model's)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="data/noise seed (use a new one when continuing from weights)"),
    lr: Optional[float] = typer.Option(None, parser=finite(min=0, min_open=True), help="peak learning rate (default: the shipped model's)"),
    warmup: Optional[int] = typer.Option(None, min=0, help="warm-up steps (default: the shipped model's)"),
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="continue from existing weights: 'shapes' (shipped) or a weights directory"),
    object_weight: Optional[float] = typer.Option(None, parser=finite(min=0), help="loss weight of object pixels (background 1)"),
    t_uniform: Optional[float] = typer.Option(None, parser=finite(min=0, max=1), help="share of timesteps drawn uniformly (default 0)"),
    colorless_rate: Optional[float] = typer.Option(
        None, parser=finite(min=0, max=1), help="share of captions that name the shapes without their colours, so shape words must be read "
        "(default 0)"),
    multi_object_rate: Optional[float] = typer.Option(
        None, parser=finite(min=0, max=1), help="share of each batch asking for two or three objects, where shape and colour words must be bound "
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
        None, parser=finite(min=0), help="weight of a reading objective: in captions that name no colour (--colorless-rate, single "
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
        None, parser=finite(min=0), help="weight of an image-label objective on the maps: at every image token, the concept words true of "
        "the image (which words, never where) must hold ConceptAttention's softmax over all the world's concepts, "
        "so that absent words take no pixels (default 0: off)"),
    coreference_weight: Optional[float] = typer.Option(
        None, parser=finite(min=0), help="weight of a co-reference objective on the maps: words that name the same pixels by what the "
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
    max_seconds: Optional[float] = typer.Option(None, parser=finite(min=0, min_open=True), help="stop (with a checkpoint) after this long"),
    stop_after: Optional[int] = typer.Option(
        None, min=1, help="stop (with a checkpoint and exported weights) after this many steps, keeping the learning-rate "
        "schedule of --steps: what --max-seconds does, but the same on every machine"),
    patch: Optional[int] = typer.Option(
        None, min=1, help="pixels per patch side (default 8; 4 -> 256 tokens); with --init-from, re-patches those weights "
        "to this size, keeping every block"),
    layers: Optional[int] = typer.Option(None, min=1, help="from scratch: double-stream blocks (default 6)"),
    single_layers: Optional[int] = typer.Option(None, min=0, help="from scratch: single-stream blocks (default 2)"),
    heads: Optional[int] = typer.Option(None, min=1, help="from scratch: attention heads (default 6)"),
    head_dim: Optional[int] = typer.Option(None, min=2, help="from scratch: width of a head (default 32)"),
    text_layers: Optional[int] = typer.Option(
        None, min=0, help="transformer layers of the text encoder (default 2; 0: no word mixing, each prompt token is its "
        "word plus its position); with --init-from only 0, which drops those weights' mixing layers"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Train the shapes model from scratch, or resume OUT/checkpoint.pt. Ctrl-C checkpoints and stops."""
    _quiet_libraries(verbose)
    _check_run_dir(out)
    from dataclasses import replace

    from .shapes.train import TrainConfig, train, use_bf16

    cfg = TrainConfig(seed=seed, bf16=use_bf16(precision, device))
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    for name, value in (("batch", batch), ("lr", lr), ("warmup", warmup), ("init_from", init_from),
                        ("object_weight", object_weight), ("t_uniform", t_uniform), ("prediction", prediction),
                        ("colorless_rate", colorless_rate), ("multi_object_rate", multi_object_rate),
                        ("reader_weight", reader_weight), ("concept_weight", concept_weight),
                        ("coreference_weight", coreference_weight)):
        if value is not None:
            cfg = replace(cfg, **{name: value})
    if concept_block:
        if cfg.concept_weight <= 0 and cfg.coreference_weight <= 0:
            raise ConceptAttentionError("--concept-block says which maps the objectives on the maps score; give it a "
                                        "--concept-weight or --coreference-weight above 0 too")
        cfg = replace(cfg, concept_blocks=tuple(concept_block))
    for option, what, field, value in (("--reader-block", "where", "reader_blocks", tuple(reader_block or ())),
                                       ("--reader-at", "what", "reader_at", reader_at)):
        if value:
            if cfg.reader_weight <= 0:
                raise ConceptAttentionError(f"{option} says {what} the reading objective reads; give it a "
                                            "--reader-weight above 0 too")
            cfg = replace(cfg, **{field: value})
    shape = {"patch": patch, "layers": layers, "single_layers": single_layers, "heads": heads, "head_dim": head_dim,
             "text_layers": text_layers}
    resuming = (Path(out) / "checkpoint.pt").is_file()
    if cfg.init_from and not resuming and patch is not None:  # re-patch the weights, not a new architecture
        cfg, shape["patch"] = replace(cfg, patch=patch), None
    if cfg.init_from and not resuming and text_layers is not None:  # drop the weights' mixing layers
        if text_layers != 0:
            raise ConceptAttentionError(
                f"--text-layers {text_layers} cannot be given to --init-from weights: their text encoder's layers can "
                "only be dropped (--text-layers 0); a new layer count needs a model from scratch")
        cfg, shape["text_layers"] = replace(cfg, drop_text_mixing=True), None
    given = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None]
    if text_positions and resuming:
        raise ConceptAttentionError(
            f"{out} holds a checkpoint, which keeps its own text positions; drop --text-positions or use a new --out")
    if text_neighbours and resuming:
        raise ConceptAttentionError(
            f"{out} holds a checkpoint, which keeps its own text encoder; drop --text-neighbours or use a new --out")
    if drop_next_word and resuming:
        raise ConceptAttentionError(
            f"{out} holds a checkpoint, which keeps its own text encoder; drop --drop-next-word or use a new --out")
    cfg = replace(cfg, text_positions=text_positions, text_neighbours=text_neighbours, drop_next_word=drop_next_word)
    if prediction is not None and resuming:
        raise ConceptAttentionError(
            f"{out} holds a checkpoint, whose weights fix what the model predicts; drop --prediction or use a new --out")
    if prediction is not None and prediction not in ("velocity", "sample"):
        raise ConceptAttentionError(f"--prediction must be 'velocity' or 'sample', not {prediction!r}")
    if given and (cfg.init_from or resuming):
        raise ConceptAttentionError(
            f"{', '.join(given)} set the architecture of a model trained from scratch; a run that resumes a checkpoint "
            "keeps its architecture, and one that starts from --init-from keeps that of its weights (only --patch may "
            "re-patch them and --text-layers 0 drop their word mixing; drop the option or use a new --out)")
    from .shapes.model import architecture

    model_cfg = architecture(**shape)
    weights = train(out, cfg, model_cfg, device=_device(device), progress=not quiet, max_seconds=max_seconds,
                    stop_after=stop_after)
    typer.echo(f"weights: {weights}")


@app.command("shapes-benchmark", **COMMAND)
def shapes_benchmark(
    out: Path = typer.Option(Path("runs/shapes-benchmark"), "--out", "-o"),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    images: int = typer.Option(500, min=1, help="held-out images for the map metrics"),
    sample_images: int = typer.Option(500, min=0, help="held-out captions generated and scored (0: skip)"),
    guidance: Optional[float] = typer.Option(None, parser=finite(min=0), help="default: the model's"),
    shift: Optional[float] = typer.Option(None, parser=finite(min=0, min_open=True),
                                          help="sampler timestep shift (default: the model's)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Held-out report of the shapes model: sample quality and every readout's map quality."""
    _quiet_libraries(verbose)
    from .pipelines import load_pipeline
    from .shapes import benchmark

    _check_run_dir(out)
    pipe = load_pipeline(model, device=_device(device))
    if not _is_shapes(pipe):
        raise ConceptAttentionError("shapes-benchmark measures a shapes model; pass 'shapes' or a train-shapes directory")
    benchmark.run(pipe, out, images=images, sample_images=sample_images, guidance=guidance, shift=shift,
                  progress=not quiet)
    typer.echo((out / "shapes_benchmark.md").read_text())


def _check_run_dir(out: Path) -> None:
    """A run folder (resumable; written as it goes) must not be a file."""
    if out.exists() and not out.is_dir():
        raise ConceptAttentionError(f"--out {out} is a file; give the path of a folder")


@app.command("eval", **COMMAND)
def eval_command(
    dataset: str = typer.Option("shapes", "--dataset", "-d", help="shapes, imagenet-seg, voc-single or voc-multi"),
    method: List[str] = typer.Option(["all"], "--method", "-m",
                                     help="'all', or method names (repeat the flag or separate by commas)"),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    data: Optional[Path] = typer.Option(None, help="gtsegs_ijcv.mat (imagenet-seg) or the VOCdevkit folder (voc-*)"),
    class_map: Optional[Path] = typer.Option(None, help="JSON: WordNet id or lemma -> concept word (imagenet-seg)"),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="run folder: records (resumable), results.json/.md"),
    limit: Optional[int] = typer.Option(None, min=1, help="only the first N images"),
    images: int = typer.Option(500, min=1, help="shapes: held-out images generated"),
    t: Optional[float] = typer.Option(None, parser=finite(min=0, max=1), help="noise level (default 0.5)"),
    samples: Optional[int] = typer.Option(None, min=1, max=256,
                                          help="noise draws per image (default: shapes 4, real models 5)"),
    seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="noise seed (image i uses seed + 1000 i)"),
    layers: Optional[List[int]] = typer.Option(None, "--layers", help=LAYERS_HELP),
    batch: Optional[int] = typer.Option(None, min=1, help="images per pass (default: shapes 50, real models 1)"),
    blur: Optional[float] = typer.Option(None, parser=finite(min=0),
                                         help="sigma of the 3x3 Gaussian blur of token maps (0: none; default: 1 on "
                                         "real datasets, as the paper)"),
    upsample: Optional[str] = typer.Option(None, help="nearest or bilinear upsampling of maps to the labels"),
    concept_tokens: Optional[str] = typer.Option(None, help="FLUX.1 / SD3: 'first' (paper) or 'mean' of a word's tokens"),
    size: Optional[str] = typer.Option(None, help="FLUX.1 / SD3: WIDTHxHEIGHT fed to the model (default: the "
                                                  "model's resolution on the longer side)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Zero-shot segmentation benchmark: methods x dataset -> results.json and a Markdown table.

    Resumable (rerun the same command), and shardable: e.g.
    `accelerate launch --multi_gpu --num_processes 2 -m conceptattention eval ...`.

    \b
    Examples:
      conceptattention eval --dataset shapes --method all --out runs/eval-shapes
      conceptattention eval --dataset voc-single --data VOCdevkit --model black-forest-labs/FLUX.1-schnell \\
          --device cuda --dtype bfloat16 --method concept_attention,cross_attention --out runs/voc
    """
    _quiet_libraries(verbose)
    from .eval.datasets import load_dataset
    from .eval.methods import resolve_methods
    from .eval.runner import TABLE_FILE, distributed_rank, evaluate

    resolve_methods(list(method))  # a typo fails before any loading
    _check_run_dir(out)
    rank, _ = distributed_rank()
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process under a launcher
    parsed_size = _parse_size(size)
    bench = load_dataset(dataset, data, images=images, class_map=class_map)
    pipe = _load(model, device, dtype, None)
    extra = _real_model_options(pipe, concept_tokens=concept_tokens, size=parsed_size)
    results = evaluate(pipe, bench, list(method), out, limit=limit, progress=not quiet, t=t, samples=samples,
                       seed=seed, layers=layers or None, batch=batch, blur=blur, upsample=upsample, **extra)
    if results is not None and not quiet and rank == 0:
        typer.echo((out / TABLE_FILE).read_text())


@app.command("app", **COMMAND)
def app_command(
    model: str = typer.Option("shapes", help=MODEL_HELP + " (fixed for every visitor unless --allow-model-choice)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    host: str = typer.Option("127.0.0.1", help="0.0.0.0 to serve other machines"),
    port: int = typer.Option(7860, min=1, max=65535),
    share: bool = typer.Option(False, help="a temporary public gradio.live link"),
    allow_model_choice: bool = typer.Option(False, "--allow-model-choice",
                                            help="let each visitor type another model name (loaded on this server)"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """A web page to try prompts and images (needs: pip install "conceptattention[app]")."""
    _quiet_libraries(verbose)
    from .app import launch

    _device(device)
    typer.echo(f"serving on http://{host}:{port}  (Ctrl-C stops)")
    launch(model, device, host, port, share, allow_model_choice=allow_model_choice)


def main(args: Optional[List[str]] = None) -> None:
    """The ``conceptattention`` command; ``args`` default to ``sys.argv[1:]``."""
    app(args=args)


if __name__ == "__main__":
    main()
