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
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer vendors its own click since 0.2x; its exceptions are the ones raised
    from typer._click import exceptions as cli_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as cli_errors  # type: ignore[no-redef]

from .errors import ConceptAttentionError, short

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


def expand_greedy(args: list[str]) -> list[str]:
    """``-c a b c`` -> ``-c a -c b -c c``: a greedy option takes every word up to the next option (or ``--``)."""
    out: list[str] = []
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

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_greedy(list(args)))


class _Group(TyperGroup):
    """Runs a command; turns every user error into one ``error:`` line and exit status 2."""

    def main(
        self,
        args: Any = None,
        prog_name: Any = None,
        complete_var: Any = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
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

    def _run(self, args: list[str], prog_name: Any, complete_var: Any, **extra: Any) -> int:
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
                _fail(
                    "the device ran out of memory: use fewer concepts, a smaller --size, fewer --samples, "
                    "--dtype bfloat16 or --offload model"
                )
            _fail(
                f"internal error ({type(err).__name__}: {err}); rerun with --verbose for the traceback, and "
                "please report it",
                code=1,
            )
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


def _usage_message(err: cli_errors.UsageError, args: list[str]) -> str:
    message = err.format_message().rstrip(".")
    command = err.ctx.command_path if err.ctx is not None else "conceptattention"
    if isinstance(err, cli_errors.MissingParameter) and any(a in GREEDY_OPTIONS for a in args):
        message += (
            " (the words after -c are all concepts: put the prompt or image before -c, or end the concepts with --)"
        )
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


def finite(min: float | None = None, max: float | None = None, min_open: bool = False) -> Any:
    """A parser for a float option that must be finite (no nan or inf) and in range."""

    def parse(value: Any) -> float | None:
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
        "image. The built-in 'shapes' model works offline on a CPU; diffusers MM-DiTs via --model (see `models`).\n\n"
        "\b\nExamples:\n"
        '  conceptattention generate "a red circle and a blue square on grass" -c circle square grass -o runs/demo\n'
        '  conceptattention encode photo.png -c circle grass --caption "a red circle on grass" -o runs/enc\n'
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
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """ConceptAttention saliency maps for diffusion transformers."""


MODEL_HELP = (
    "'shapes' (built in, offline), a directory written by train-shapes, or a supported diffusers model "
    "(`conceptattention models`): hub id or local directory"
)
DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
DTYPE_HELP = "auto, float32, bfloat16 or float16"
LAYERS_HELP = "double-stream blocks to read, e.g. --layers 2 --layers 3 (default: the model's)"
METHOD_HELP = (
    "the map: concept_attention (the paper, default) or any concept-stream method of `eval` (bounce_2, "
    "anchor_propagation, heads_lambda2, ...), optionally with settings, e.g. concept_attention:bounces=3"
)


def _readout_of(method: str) -> str:
    """The readout behind a --method of generate / encode; one clear error for any other method."""
    from .eval.methods import METHODS, resolve_methods

    chosen = resolve_methods([method])
    if len(chosen) != 1 or chosen[0].readout is None:
        others = ", ".join(n for n, m in METHODS.items() if m.readout is None)
        raise ConceptAttentionError(
            f"--method takes one map of the concept stream, e.g. concept_attention, bounce_2 or anchor_propagation "
            f"(any method of `eval` but {others}), not {method!r}"
        )
    return chosen[0].readout


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


def _load(model: str, device: str, dtype: str, offload: str | None) -> Any:
    from .pipelines import load_pipeline

    if offload not in (None, "model", "sequential"):
        raise ConceptAttentionError(f"--offload must be 'model' or 'sequential', not {offload!r}")
    return load_pipeline(model, device=_device(device), torch_dtype=_dtype(dtype), offload=offload)


def _options(pipe: Any, **options: Any) -> dict:
    """The model-specific options that were given; one clear error for those this model does not take."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - pipe.options)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        takes = ", ".join("--" + k.replace("_", "-") for k in sorted(pipe.options & set(options))) or "none"
        raise ConceptAttentionError(
            f"{flags} {'does' if len(unknown) == 1 else 'do'} not apply to the {short(pipe.name)} model "
            f"(of these options it takes {takes})"
        )
    return given


def _concepts(concepts: list[str]) -> list[str]:
    from .pipelines.options import concept_words

    return concept_words(concepts)


def _parse_size(size: str | None) -> tuple[int, int] | None:
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


OUT_HELP = (
    "output folder: new, empty, or holding an earlier result, which is replaced whole once the new one is "
    "complete (a folder holding other files is refused)"
)


@app.command(**COMMAND)
def generate(
    prompt: str = typer.Argument(..., help="what to draw, e.g. 'a red circle and a blue square on grass'"),
    concepts: list[str] = typer.Option(
        ..., "--concepts", "-c", help="concept words: every word after -c up to the next option"
    ),
    out: Path = typer.Option(Path("runs/generate"), "--out", "-o", help=OUT_HELP),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    steps: int | None = typer.Option(None, min=1, max=1000, help="denoising steps (default: the model's; shapes 20)"),
    guidance: float | None = typer.Option(None, parser=finite(min=0), help="guidance scale (default: the model's)"),
    shift: float | None = typer.Option(
        None,
        parser=finite(min=0, min_open=True),
        help="timestep shift of the shapes model's sampler (default: the model's; diffusers models use their scheduler's)",
    ),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    layers: list[int] | None = typer.Option(None, "--layers", help=LAYERS_HELP),
    method: str = typer.Option("concept_attention", "--method", "-m", help=METHOD_HELP),
    height: int | None = typer.Option(None, min=16, max=16384, help="image height (diffusers models only)"),
    width: int | None = typer.Option(None, min=16, max=16384, help="image width (diffusers models only)"),
    frames: int | None = typer.Option(None, min=1, max=100000, help="frames of the video (video models only)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    offload: str | None = typer.Option(None, help="'model' or 'sequential' CPU offload (diffusers models)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Generate an image from PROMPT and one saliency map per concept.

    Writes image.png, maps.npy, maps_raw.npy, <concept>.png overlays, grid.png, segmentation.png and
    result.json into --out.

    \b
    Examples:
      conceptattention generate "a red circle and a blue square on grass" -c circle square grass -o runs/demo
      conceptattention generate "a dog next to a tree" -c dog tree sky --model OWNER/NAME \\
          --steps 4 --device cuda --dtype bfloat16 -o runs/dog     (hub ids: conceptattention models)
    """
    _quiet_libraries(verbose)
    from .pipelines import is_shapes_model

    words = _concepts(concepts)
    readout = _readout_of(method)  # a bad method fails before any loading
    if shift is not None and not is_shapes_model(model):  # before loading a model of many GB
        raise ConceptAttentionError(
            "--shift sets the shapes model's sampler; diffusers models use the shift of "
            "their own scheduler (set it on the diffusers pipeline in Python)"
        )
    out = _check_out(out)
    pipe = _load(model, device, dtype, offload)
    progress = (not quiet) if "progress" in pipe.options else None
    extra = _options(pipe, height=height, width=width, shift=shift, progress=progress, frames=frames)
    extra.update({k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None})
    result = pipe.generate(prompt, words, seed=seed, layers=layers, readouts=(readout,), **extra)
    _report(result, out, quiet)


@app.command(**COMMAND)
def encode(
    image: Path = typer.Argument(
        ...,
        help="image file (any size or mode; fitted to the model's input); for video models a video file or frames folder",
    ),
    concepts: list[str] = typer.Option(
        ..., "--concepts", "-c", help="concept words: every word after -c up to the next option"
    ),
    caption: str = typer.Option("", help="caption of the image (the paper uses 'a {class}')"),
    out: Path = typer.Option(Path("runs/encode"), "--out", "-o", help=OUT_HELP),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    t: float = typer.Option(0.5, parser=finite(min=0, max=1), help="noise level of the single pass, in [0, 1]"),
    samples: int | None = typer.Option(
        None,
        min=1,
        max=256,
        help="noise samples averaged, batched in one pass (default: the model's; shapes 4, diffusers models 5)",
    ),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    layers: list[int] | None = typer.Option(None, "--layers", help=LAYERS_HELP),
    method: str = typer.Option("concept_attention", "--method", "-m", help=METHOD_HELP),
    size: str | None = typer.Option(None, help="WIDTHxHEIGHT fed to the model (diffusers models only)"),
    frames: int | None = typer.Option(
        None, min=1, max=100000, help="at most this many frames of the video (video models; default: all it takes)"
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    offload: str | None = typer.Option(None, help="'model' or 'sequential' CPU offload (diffusers models)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Saliency maps of the concepts in a real IMAGE (noise at t, several noise draws, one early-stopped pass).

    \b
    Examples:
      conceptattention encode runs/demo/image.png -c circle square grass --caption "a red circle on grass" -o runs/enc
      conceptattention encode dog.jpg -c dog grass sky background --caption "a dog" \\
          --model path/to/diffusers-model --device cuda --dtype bfloat16 -o runs/dog
    """
    _quiet_libraries(verbose)
    from .pipelines import open_image
    from .pipelines.video import is_video_path, load_video

    words = _concepts(concepts)
    readout = _readout_of(method)  # a bad method fails before any loading
    parsed_size = _parse_size(size)
    out = _check_out(out)
    is_video = is_video_path(image)
    picture: Any = load_video(image) if is_video else open_image(image)  # unreadable: fails before loading
    pipe = _load(model, device, dtype, offload)
    extra = _options(pipe, size=parsed_size, frames=frames)
    makes_video = "frames" in pipe.options
    if is_video and not makes_video:
        raise ConceptAttentionError(f"{short(str(image))} is a video, but {short(pipe.name)} is an image model")
    if makes_video and not is_video:
        picture = [picture]  # an image is a video of one frame
    samples = pipe.default_samples if samples is None else samples
    result = pipe.encode(
        picture, words, caption=caption, t=t, samples=samples, seed=seed, layers=layers, readouts=(readout,), **extra
    )
    _report(result, out, quiet)


LAB_MISSING = (
    "train-shapes needs the lab, which a pip install of conceptattention does not include: from a clone "
    "of the repository, pip install -e lab"
)


@app.command("train-shapes", **COMMAND)
def train_shapes(
    config: Path = typer.Option(
        ...,
        "--config",
        help="the stage's settings, a JSON file such as "
        "lab/stages/stage01.json (its keys are the only training settings)",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="run directory (checkpoint, log, exported weights); rerun with the same --out to resume",
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    precision: str | None = typer.Option(
        None, help="bf16 (autocast) or fp32 (TF32 matrix products on CUDA); default: the stage's"
    ),
    stop_after: int | None = typer.Option(
        None,
        min=1,
        help="stop (with a checkpoint and exported weights) after this many steps, keeping the stage's "
        "learning-rate schedule (default: the stage's stop_after, else its whole schedule)",
    ),
    max_seconds: float | None = typer.Option(
        None, parser=finite(min=0, min_open=True), help="stop (with a checkpoint) after this long"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Train a stage of the shapes model (needs the lab: pip install -e lab), or resume OUT/checkpoint.pt.

    Ctrl-C checkpoints and stops; rerunning the same command resumes.

    \b
    Example:
      conceptattention train-shapes --config lab/stages/stage01.json --out runs/s1
    """
    _quiet_libraries(verbose)
    _check_run_dir(out)
    if precision is not None and precision not in ("bf16", "fp32"):
        raise ConceptAttentionError(f"--precision must be bf16 or fp32, not {precision!r}")
    try:
        from conceptattention_lab import train as lab
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != "conceptattention_lab":
            raise
        raise ConceptAttentionError(LAB_MISSING) from None
    weights = lab.run_stage(
        config,
        out,
        device=_device(device),
        precision=precision,
        progress=not quiet,
        max_seconds=max_seconds,
        stop_after=stop_after,
    )
    typer.echo(f"weights: {weights}")


@app.command("shapes-benchmark", **COMMAND)
def shapes_benchmark(
    out: Path = typer.Option(Path("runs/shapes-benchmark"), "--out", "-o"),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    images: int = typer.Option(500, min=1, help="held-out images for the map metrics"),
    sample_images: int = typer.Option(500, min=0, help="held-out captions generated and scored (0: skip)"),
    guidance: float | None = typer.Option(None, parser=finite(min=0), help="default: the model's"),
    shift: float | None = typer.Option(
        None, parser=finite(min=0, min_open=True), help="sampler timestep shift (default: the model's)"
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Held-out report of the shapes model: sample quality and every readout's map quality."""
    _quiet_libraries(verbose)
    from .eval import shapes_report
    from .pipelines import load_pipeline

    _check_run_dir(out)
    pipe = load_pipeline(model, device=_device(device))
    from .pipelines.shapes import ShapesPipeline

    if not isinstance(pipe, ShapesPipeline):
        raise ConceptAttentionError(
            "shapes-benchmark measures a shapes model; pass 'shapes' or a train-shapes directory"
        )
    shapes_report.run(
        pipe, out, images=images, sample_images=sample_images, guidance=guidance, shift=shift, progress=not quiet
    )
    typer.echo((out / "shapes_benchmark.md").read_text())


def _check_run_dir(out: Path) -> None:
    """A run folder (resumable; written as it goes) must not be a file."""
    if out.exists() and not out.is_dir():
        raise ConceptAttentionError(f"--out {out} is a file; give the path of a folder")


@app.command("eval", **COMMAND)
def eval_command(
    dataset: str = typer.Option("shapes", "--dataset", "-d", help="shapes, imagenet-seg, voc-single or voc-multi"),
    method: list[str] = typer.Option(
        ["all"], "--method", "-m", help="'all', or method names (repeat the flag or separate by commas)"
    ),
    model: str = typer.Option("shapes", help=MODEL_HELP),
    data: Path | None = typer.Option(None, help="gtsegs_ijcv.mat (imagenet-seg) or the VOCdevkit folder (voc-*)"),
    class_map: Path | None = typer.Option(None, help="JSON: WordNet id or lemma -> concept word (imagenet-seg)"),
    out: Path = typer.Option(
        Path("runs/eval"), "--out", "-o", help="run folder: records (resumable), results.json/.md"
    ),
    limit: int | None = typer.Option(None, min=1, help="only the first N images"),
    images: int = typer.Option(500, min=1, help="shapes: held-out images generated"),
    t: float | None = typer.Option(None, parser=finite(min=0, max=1), help="noise level (default 0.5)"),
    samples: int | None = typer.Option(
        None, min=1, max=256, help="noise draws per image (default: the model's; shapes 4, diffusers models 5)"
    ),
    seed: int | None = typer.Option(None, min=0, max=SEED_MAX, help="noise seed (image i uses seed + 1000 i)"),
    layers: list[int] | None = typer.Option(None, "--layers", help=LAYERS_HELP),
    batch: int | None = typer.Option(None, min=1, help="images per pass (default: shapes 50, real models 1)"),
    blur: float | None = typer.Option(
        None,
        parser=finite(min=0),
        help="sigma of the 3x3 Gaussian blur of token maps (0: none; default: 1 on real datasets, as the paper)",
    ),
    upsample: str | None = typer.Option(None, help="nearest or bilinear upsampling of maps to the labels"),
    concept_tokens: str | None = typer.Option(
        None, help="diffusers models: 'first' (paper) or 'mean' of a word's tokens"
    ),
    size: str | None = typer.Option(
        None,
        help="diffusers models: WIDTHxHEIGHT fed to the model (default: the model's resolution on the longer side)",
    ),
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
      conceptattention eval --dataset voc-single --data VOCdevkit --model OWNER/NAME \\
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
    extra = _options(pipe, concept_tokens=concept_tokens, size=parsed_size)
    results = evaluate(
        pipe,
        bench,
        list(method),
        out,
        limit=limit,
        progress=not quiet,
        t=t,
        samples=samples,
        seed=seed,
        layers=layers or None,
        batch=batch,
        blur=blur,
        upsample=upsample,
        **extra,
    )
    if results is not None and not quiet and rank == 0:
        typer.echo((out / TABLE_FILE).read_text())


@app.command("models", **COMMAND)
def models_command() -> None:
    """The supported diffusers model families: their pipelines, transformers and example hub ids."""
    from .families import FAMILIES

    for family in FAMILIES:
        typer.echo(f"{family.title}: {', '.join(family.pipeline_classes)} ({', '.join(family.transformer_classes)})")
        for example in family.examples:
            typer.echo(f"    --model {example}")


@app.command("app", **COMMAND)
def app_command(
    model: str = typer.Option("shapes", help=MODEL_HELP + " (fixed for every visitor unless --allow-model-choice)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
    host: str = typer.Option("127.0.0.1", help="0.0.0.0 to serve other machines"),
    port: int = typer.Option(7860, min=1, max=65535),
    share: bool = typer.Option(False, help="a temporary public gradio.live link"),
    allow_model_choice: bool = typer.Option(
        False, "--allow-model-choice", help="let each visitor type another model name (loaded on this server)"
    ),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """A web page to try prompts and images (needs: pip install "conceptattention[app]")."""
    _quiet_libraries(verbose)
    from .app import launch

    _device(device)
    typer.echo(f"serving on http://{host}:{port}  (Ctrl-C stops)")
    launch(model, device, host, port, share, allow_model_choice=allow_model_choice)


def main(args: list[str] | None = None) -> None:
    """The ``conceptattention`` command; ``args`` default to ``sys.argv[1:]``."""
    app(args=args)


if __name__ == "__main__":
    main()
