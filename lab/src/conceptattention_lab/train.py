"""The trainer of the shapes model: rectified flow on freshly generated shapes-world batches.

A stage of training is one JSON file of settings (``lab/stages/stageNN.json``, read by :func:`load_stage`);
``conceptattention train-shapes --config STAGE.json --out DIR`` runs it through :func:`run_stage`.

Reproducible from (settings, seed): the batch of step s is ``sample_scenes(batch, seed=data_seed(s))``
and the noise/timesteps of step s come from a generator seeded by (seed, s), so a resumed run sees
exactly what an uninterrupted run would. Checkpoints (model, EMA, optimiser, step) are written
atomically every ``checkpoint_every`` steps and on interruption; ``train`` resumes from the last one,
with the settings it was started with. A checkpoint holds only tensors and plain values (the configs
as dicts), and is read back with ``torch.load(..., weights_only=True)``, which runs no pickled code.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from conceptattention.core import ConceptAttention, default_layers
from conceptattention.errors import ConceptAttentionError
from conceptattention.readouts import layer_scores
from conceptattention.shapes import world
from conceptattention.shapes.model import PREDICTIONS, ShapesConfig, ShapesModel, pack

from . import surgery


@dataclass
class TrainConfig:
    """The settings of a training stage (the keys of a stage file but those of :class:`Stage` itself)."""

    steps: int = 3800  # length of the learning-rate schedule
    batch: int = 64
    lr: float = 6e-4  # peak learning rate
    warmup: int = 300
    weight_decay: float = 0.0
    ema: float = 0.999
    seed: int = 0  # data and noise seed
    caption_dropout: float = 0.1  # share of empty captions (classifier-free guidance)
    single_word_rate: float = 0.15  # share of captions that are one true word
    colorless_rate: float = 0.0  # share of captions naming shapes without colours (world.captions)
    multi_object_rate: float = 0.0  # share of each batch asking for 2-3 objects (the rest: the world's own mix)
    t_mean: float = 0.3  # logit-normal timestep sampling, tilted towards noise
    t_std: float = 1.0
    t_uniform: float = 0.0  # share of timesteps drawn uniformly instead
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast (CPU, CUDA); False: float32 (TF32 matrix products on CUDA)
    checkpoint_every: int = 200
    log_every: int = 20
    init_from: str = ""  # start from these weights ("shapes": the installed model, or a weights/run directory)
    object_weight: float = 1.0  # loss weight of pixels on or within 2 px of an object (background: 1)
    prediction: str = ""  # with init_from: "velocity" or "sample", what the transformer outputs ("": keep)
    patch: int = 0  # with init_from: re-patch those weights to this patch size (surgery.repatch; 0: keep)
    drop_text_mixing: bool = False  # remove the text encoder's layers before training (surgery.drop_text_mixing)
    text_neighbours: bool = False  # let prompt tokens add their neighbouring words (surgery.mix_text_neighbours)
    reader_weight: float = 0.0  # weight of the reading objective (reader_targets; 0: plain denoising)
    reader_t_max: float = 0.8  # the reading objective only counts images noised at most this much
    reader_blocks: tuple[int, ...] = ()  # double-stream blocks whose text output is read (reader_heads; (): the last)
    reader_at: str = "block"  # what is read there: "block" (the text stream as the block leaves it) or "attention"
    concept_weight: float = 0.0  # weight of the image-label objective on the maps (true_concept_loss; 0: off)
    concept_t_max: float = 0.8  # the objectives on the maps only count images noised at most this much
    coreference_weight: float = 0.0  # weight of the co-reference objective on the maps (coreference_loss; 0: off)


@dataclass
class Stage:
    """A stage file (``lab/stages/stageNN.json``): the training settings, the step after which the stage
    stopped (its exported weights are those of that step; None: at the end of the schedule), and what the
    stage did and where it ran."""

    cfg: TrainConfig
    stop_after: int | None = None
    note: str = ""
    hardware: str = ""


#: Keys of a stage file that describe the stage without changing its training.
STAGE_INFO = ("note", "hardware")
#: Settings that a resumed run may change: the schedule's length and how often it logs and checkpoints.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every")
PRECISIONS = ("bf16", "fp32")
#: What the reading objective reads at a block: the text stream as the block leaves it, or the text tokens'
#: attention outputs (before the output projection: for a concept, the vector ConceptAttention compares).
READ_AT = ("block", "attention")

_SHARES = (
    "caption_dropout",
    "single_word_rate",
    "colorless_rate",
    "multi_object_rate",
    "t_uniform",
    "reader_t_max",
    "concept_t_max",
)
_AT_LEAST = {
    "steps": 1,
    "batch": 1,
    "warmup": 0,
    "seed": 0,
    "checkpoint_every": 1,
    "log_every": 1,
    "patch": 0,
    "weight_decay": 0.0,
    "object_weight": 0.0,
    "reader_weight": 0.0,
    "concept_weight": 0.0,
    "coreference_weight": 0.0,
}
_ABOVE = {"lr": 0.0, "t_std": 0.0, "grad_clip": 0.0}
_CHOICES = {"prediction": ("", *PREDICTIONS), "reader_at": READ_AT}


def _kind(value) -> str:
    return {
        bool: "true/false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _setting(name: str, value, where: str):
    """One stage setting checked against :class:`TrainConfig`'s field ``name``: its value as the config holds it."""
    default = TrainConfig.__dataclass_fields__[name].default
    bad = f"{where}: {name!r} must be"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConceptAttentionError(f"{bad} true or false, not {json.dumps(value)} ({_kind(value)})")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConceptAttentionError(f"{bad} a list of whole numbers (block indices), not {json.dumps(value)}")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConceptAttentionError(f"{bad} a string, not {json.dumps(value)} ({_kind(value)})")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConceptAttentionError(f"{bad} one of {', '.join(map(repr, _CHOICES[name]))}, not {value!r}")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConceptAttentionError(f"{bad} a whole number, not {json.dumps(value)} ({_kind(value)})")
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConceptAttentionError(f"{bad} a finite number, not {json.dumps(value)} ({_kind(value)})")
    else:
        value = float(value)
    if name in _SHARES and not 0 <= value <= 1:
        raise ConceptAttentionError(f"{bad} between 0 and 1, not {value:g}")
    if name in _AT_LEAST and value < _AT_LEAST[name]:
        raise ConceptAttentionError(f"{bad} at least {_AT_LEAST[name]:g}, not {value:g}")
    if name in _ABOVE and value <= _ABOVE[name]:
        raise ConceptAttentionError(f"{bad} above {_ABOVE[name]:g}, not {value:g}")
    if name == "ema" and not 0 <= value < 1:
        raise ConceptAttentionError(f"{bad} at least 0 and below 1, not {value:g}")
    return value


def stage_settings(raw, where: str = "the stage config") -> Stage:
    """A stage (a dict as read from its JSON file) checked key by key. A setting the file leaves out keeps its
    :class:`TrainConfig` default; an unknown key, a value of the wrong type or out of range is one clear
    error naming ``where``."""
    if not isinstance(raw, dict):
        raise ConceptAttentionError(f"{where} must hold a JSON object of training settings, not {_kind(raw)}")
    known = [f.name for f in fields(TrainConfig)]
    values, info = {}, {}
    for key, value in raw.items():
        if key in STAGE_INFO:
            if not isinstance(value, str):
                raise ConceptAttentionError(f"{where}: {key!r} must be a string, not {json.dumps(value)}")
            info[key] = value
        elif key == "stop_after":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConceptAttentionError(
                    f"{where}: 'stop_after' must be a step count, 1 or more (or null), not {json.dumps(value)}"
                )
            info[key] = value
        elif key in known:
            values[key] = _setting(key, value, where)
        else:
            every = known + ["stop_after", *STAGE_INFO]
            close = difflib.get_close_matches(key, every, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConceptAttentionError(f"{where}: unknown setting {key!r}{hint}; the settings are {', '.join(every)}")
    cfg = TrainConfig(**values)
    if cfg.reader_weight <= 0 and (cfg.reader_blocks or cfg.reader_at != "block"):
        raise ConceptAttentionError(
            f"{where}: reader_blocks and reader_at say where the reading objective reads; "
            "give it a reader_weight above 0 too"
        )
    if not cfg.init_from and (cfg.patch or cfg.prediction or cfg.drop_text_mixing or cfg.text_neighbours):
        raise ConceptAttentionError(
            f"{where}: patch, prediction, drop_text_mixing and text_neighbours change the "
            "init_from weights; a model from scratch has the installed default architecture"
        )
    if info.get("stop_after") is not None and info["stop_after"] > cfg.steps:
        raise ConceptAttentionError(
            f"{where}: 'stop_after' ({info['stop_after']}) is past the schedule's {cfg.steps} steps"
        )
    return Stage(cfg, **info)


def load_stage(path: Path) -> Stage:
    """The stage file ``path`` read and checked (see :func:`stage_settings`)."""
    path = Path(path)
    if not path.is_file():
        raise ConceptAttentionError(f"no stage config at {path} (the shipped stages are lab/stages/stageNN.json)")
    try:
        raw = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ConceptAttentionError(f"{path} is not a text file of JSON settings") from None
    except json.JSONDecodeError as err:
        raise ConceptAttentionError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    return stage_settings(raw, str(path))


def data_seed(seed: int, step: int) -> int:
    """The scene seed of a training step; never the held-out benchmark's seed."""
    value = 1_000_003 * (seed + 1) + step
    return value + 1 if value == world.HELDOUT_SEED else value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


MULTI_SEED_OFFSET = 7_777_777  # seeds the multi-object part of a batch away from every plain one in use


def training_scenes(cfg: TrainConfig, step: int) -> world.Scenes:
    """Step ``step``'s scenes: the world's own mix (60% single objects); with ``multi_object_rate``, that share
    of the batch (rounded) is instead the first scenes with two or more objects from draws of other seeds, so
    they follow the world's own distribution of multi-object scenes (object sizes included)."""
    multi = round(cfg.batch * cfg.multi_object_rate)
    plain = world.sample_scenes(cfg.batch - multi, data_seed(cfg.seed, step))
    if multi == 0:
        return plain
    parts, found, draw = [plain], 0, 0
    while found < multi:
        draw += 1
        pool = world.sample_scenes(4 * multi, data_seed(cfg.seed + draw * MULTI_SEED_OFFSET, step))
        keep = (pool.present.sum(1) >= 2).nonzero()[:, 0][: multi - found]
        parts.append(pool.select(keep))
        found += len(keep)
    return world.Scenes.cat(parts)


def reader_targets(scenes: world.Scenes, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Targets of the reading objective, ``[B, max_tokens]`` long, -1 where nothing is asked.

    In a caption that names no colour ("a circle and a square on grass", or the single word "circle"),
    each shape word's token is asked the colour of the object it names, which only the image can tell
    (skipped where the caption's objects of that shape differ in colour). To answer, the token must
    find its own object among the image tokens. No mask is used.
    """
    targets = torch.full((len(texts), max_tokens), -1, dtype=torch.long)
    colour_words = set(world.COLOR_NAMES)
    for i, text in enumerate(texts):
        words = text.split()
        if not words or colour_words.intersection(words):
            continue
        objects = scenes.objects(i)
        for j, word in enumerate(words[:max_tokens]):
            if word in world.SHAPES:
                colours = {colour for colour, shape in objects if shape == word}
                if len(colours) == 1:
                    targets[i, j] = world.COLOR_NAMES.index(colours.pop())
    return targets


def _double_blocks(model: ShapesModel, named: list[int], what: str) -> list[int]:
    """``named`` double-stream blocks (negative indices count from the end), sorted, each once; a block the
    model does not have is an error naming ``what`` asked for it."""
    n = len(model.transformer.transformer_blocks)
    bad = [b for b in named if not -n <= b < n]
    if bad:
        raise ConceptAttentionError(
            f"{what} blocks {bad} are not double-stream blocks of this model; it has {n} "
            f"(0 to {n - 1}, or -1 for the last)"
        )
    return sorted({b % n for b in named})


def read_blocks(cfg: TrainConfig, model: ShapesModel) -> list[int]:
    """The double-stream blocks whose text output the reading objective reads, in order: ``cfg.reader_blocks``
    (negative indices count from the end), or the last block when none are named."""
    if cfg.reader_at not in READ_AT:
        raise ConceptAttentionError(f"the reading objective reads {' or '.join(READ_AT)}, not {cfg.reader_at!r}")
    n = len(model.transformer.transformer_blocks)
    return _double_blocks(model, [int(b) for b in cfg.reader_blocks] or [n - 1], "reader")


@contextmanager
def text_reads(model: ShapesModel, blocks: list[int], at: str = "block") -> Iterator[dict[int, torch.Tensor]]:
    """While open, a forward pass leaves in the yielded dict, per double-stream block in ``blocks``, the text
    tokens' states ``[B, L, width]`` that the reading objective reads (``at``: see :data:`READ_AT`); one pass
    per opening (a later pass's states are not kept). The hooks are removed on exit, whatever happens inside."""
    states: dict[int, torch.Tensor] = {}
    hooks = []
    try:
        for b in blocks:
            block = model.transformer.transformer_blocks[b]
            if at == "attention":  # the text tokens' attention outputs, as the output projection gets them

                def keep_input(module, args, b=b):  # the first call is the prompt's: a ConceptAttention
                    states.setdefault(b, args[0])  # stream in the same pass projects its concepts after it

                hooks.append(block.attn.to_add_out.register_forward_pre_hook(keep_input))
            else:  # the text stream as the block leaves it

                def keep_output(module, args, output, b=b):
                    states[b] = output[0]

                hooks.append(block.register_forward_hook(keep_output))
        yield states
    finally:
        for hook in hooks:
            hook.remove()


class _LayerScores(ConceptAttention):
    """ConceptAttention that keeps, with their autograd graph, each read block's raw scores ``o_x · o_c``
    ``[B, K, N]`` (before the softmax over concepts) in ``self.scores``, in block order."""

    def reset(self) -> None:
        super().reset()
        self.scores: list[torch.Tensor] = []

    def _accumulate(self, index, image_out, concept_out, image_value, image_key, image_query, step) -> None:
        k = self.num_concepts
        self.scores.append(
            layer_scores(
                "output",
                image_out=image_out,
                concept_out=concept_out[:, :k],
                image_value=image_value,
                concept_value=step.value[:, :, :k],
                image_key=image_key,
                concept_query=step.query[:, :, :k],
            )
        )


def map_blocks(model: ShapesModel) -> list[int]:
    """The double-stream blocks whose maps the objectives on the maps (image labels, co-reference) score:
    the model's own map layers (those ConceptAttention reads by default)."""
    n = len(model.transformer.transformer_blocks)
    return _double_blocks(model, list(model.config.map_layers or default_layers(n)), "map")


@contextmanager
def concept_scores(model: ShapesModel, blocks: list[int]) -> Iterator[list[torch.Tensor]]:
    """While open, a forward pass of ``model`` also runs ConceptAttention's concept stream for every word of
    :data:`world.CONCEPTS` (encoded alone, as the maps encode them) and leaves each block's raw scores in
    the yielded list, differentiable. No blocks: nothing is hooked and the list stays empty."""
    if not blocks:
        yield []
        return
    embeds = model.encode_concepts(list(world.CONCEPTS))
    with _LayerScores(model.transformer, embeds, layers=blocks, differentiable=True) as session:
        yield session.scores


def _no_loss(scores: list[torch.Tensor]) -> torch.Tensor:
    """Zero, with a graph through ``scores``: an objective with nothing to score still gives every scored
    parameter a (zero) gradient."""
    return sum(s.sum() for s in scores) * 0.0


def true_concept_loss(scores: list[torch.Tensor], true: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
    """The image-label objective on the maps: at every image token, the concepts true of the image
    (``true`` ``[B, K]``, :func:`world.true_concepts`) should hold the softmax over concepts between them.
    Per block, the mean over tokens of ``-log`` (the true concepts' summed share), averaged over blocks and
    over the images in ``asked`` ``[B]``. It uses which words are true of an image, never where: which true
    word takes which token is left to the model. Zero (with a graph) when no image is asked."""
    if not bool(asked.any()):
        return _no_loss(scores)
    losses = []
    for raw in scores:  # [B, K, N]
        raw = raw[asked].float()
        log_all = raw.logsumexp(1)
        log_true = raw.masked_fill(~true[asked][:, :, None], float("-inf")).logsumexp(1)
        losses.append((log_all - log_true).mean())
    return torch.stack(losses).mean()


def coreference_loss(scores: list[torch.Tensor], same: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
    """The co-reference objective on the maps: two words that name the same pixels (``same`` ``[B, K, K]``,
    :func:`world.coreferent_concepts`: what the caption says, no mask) should have the same map. At each
    image token, the pair's split of their joint share, ``sigmoid(d_1 - d_2)`` for their scores ``d``, is
    scored against an even split (binary cross-entropy minus its floor ``log 2``: zero for equal scores,
    about half the gap for a large one), weighted by the pair's joint share; the weighted mean per pair,
    averaged over pairs, blocks and the images in ``asked``. Zero (with a graph) when there is no pair."""
    pairs = (same & asked[:, None, None]).triu(1).nonzero()  # [P, 3]: image, concept, concept
    if len(pairs) == 0:
        return _no_loss(scores)
    image, first, second = pairs.unbind(1)
    losses = []
    for raw in scores:  # [B, K, N]
        raw = raw.float()
        share = raw.softmax(1)
        gap = raw[image, first] - raw[image, second]  # [P, N]
        split = 0.5 * (torch.nn.functional.softplus(gap) + torch.nn.functional.softplus(-gap)) - math.log(2.0)
        weight = (share[image, first] + share[image, second]).detach()
        losses.append(((split * weight).sum(1) / weight.sum(1).clamp_min(1e-12)).mean())
    return torch.stack(losses).mean()


def reader_heads(cfg: TrainConfig, model: ShapesModel) -> torch.nn.ModuleList | None:
    """The reading objective's heads, one linear read (text width -> colours) per read block; used in training
    only and never exported. None when the objective is off."""
    if cfg.reader_weight <= 0:
        return None
    width = model.transformer.inner_dim
    return torch.nn.ModuleList(torch.nn.Linear(width, len(world.COLOR_NAMES)) for _ in read_blocks(cfg, model))


def batch_loss(
    model: ShapesModel,
    step: int,
    cfg: TrainConfig,
    device: torch.device,
    reader: torch.nn.ModuleList | None = None,
    parts: dict | None = None,
) -> torch.Tensor:
    """The step's loss; with ``reader`` (:func:`reader_heads`), plus the reading objective: its cross-entropy,
    averaged over the read blocks, goes to ``parts["reader"]`` and each block's to ``parts["reader_each"]``.
    The objectives on the maps' unweighted values go to ``parts["concepts"]`` and ``parts["coreference"]``."""
    scenes = training_scenes(cfg, step)
    images, labels = world.render(scenes, device)
    texts = world.captions(scenes, cfg.single_word_rate, cfg.colorless_rate)
    noise_seed = cfg.seed * 7_919 + step
    g = torch.Generator().manual_seed(noise_seed)
    drop = torch.rand(cfg.batch, generator=g) < cfg.caption_dropout
    texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
    x0 = pack(images * 2 - 1, model.config.patch)
    if device.type == "cpu":
        noise = torch.randn(x0.shape, generator=g)
    else:  # drawn where it is used: a CPU draw plus a copy would cost more than the step on a GPU
        g_dev = torch.Generator(device).manual_seed(noise_seed)
        noise = torch.randn(x0.shape, generator=g_dev, device=device)
    t = torch.sigmoid(torch.randn(cfg.batch, generator=g) * cfg.t_std + cfg.t_mean)
    if cfg.t_uniform > 0:  # drawn only when asked for: a stage without them keeps its numbers
        uniform = torch.rand(cfg.batch, generator=g)
        t = torch.where(torch.rand(cfg.batch, generator=g) < cfg.t_uniform, uniform, t)
    t = t.to(device)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    blocks = read_blocks(cfg, model) if reader is not None else []
    if reader is not None and len(blocks) != len(reader):
        raise ConceptAttentionError(f"{len(reader)} reader heads for {len(blocks)} read blocks ({blocks})")
    scored = map_blocks(model) if cfg.concept_weight > 0 or cfg.coreference_weight > 0 else []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        with text_reads(model, blocks, cfg.reader_at) as text_state, concept_scores(model, scored) as scores:
            tokens, pooled = model.encode_text(texts)
            pred = model.velocity(x_t, t, tokens, pooled)
    error = (pred.float() - (noise - x0)).pow(2)
    if cfg.object_weight == 1.0:
        loss = error.mean()
    else:
        weights = pixel_weights(labels, cfg.object_weight, model.config.patch)
        loss = (error * weights).sum() / weights.sum()
    map_asked = t <= cfg.concept_t_max  # images the objectives on the maps count
    if cfg.concept_weight > 0:
        maps = true_concept_loss(scores, world.true_concepts(scenes).to(device), map_asked)
        if parts is not None:
            parts["concepts"] = maps.detach()
        loss = loss + cfg.concept_weight * maps
    if cfg.coreference_weight > 0:
        alike = coreference_loss(scores, world.coreferent_concepts(scenes).to(device), map_asked)
        if parts is not None:
            parts["coreference"] = alike.detach()
        loss = loss + cfg.coreference_weight * alike
    if reader is None:
        return loss
    targets = reader_targets(scenes, texts, model.config.max_tokens).to(device)
    targets[t > cfg.reader_t_max] = -1
    asked = targets >= 0
    if not bool(asked.any()):
        return loss + 0.0 * sum(p.sum() for p in reader.parameters())  # every parameter keeps a gradient
    each = []
    for head, b in zip(reader, blocks):
        state = text_state[b][asked].float()
        logits = head(torch.nn.functional.layer_norm(state, state.shape[-1:]))  # a scale-free read
        each.append(torch.nn.functional.cross_entropy(logits, targets[asked]))
    each = torch.stack(each)
    reading = each.mean()
    if parts is not None:
        parts["reader"], parts["reader_each"] = reading.detach(), each.detach()
    return loss + cfg.reader_weight * reading


def pixel_weights(labels: torch.Tensor, object_weight: float, patch: int) -> torch.Tensor:
    """Loss weights in the token layout ``[B, N, 3 p^2]``: ``object_weight`` on objects and a 2-px rim
    around them, 1 on the background."""
    near = torch.nn.functional.max_pool2d((labels > 0).float()[:, None], kernel_size=5, stride=1, padding=2)
    weights = 1.0 + (object_weight - 1.0) * near
    return pack(weights.expand(-1, 3, -1, -1).contiguous(), patch)


def init_model(source: str) -> ShapesModel:
    """Float32 copy of existing weights to continue training from: "shapes" (the installed model), a weights
    directory, or a run directory (its ``weights/``)."""
    from conceptattention.pipelines.shapes import WEIGHTS_DIR

    directory = WEIGHTS_DIR if source == "shapes" else Path(source)
    if (directory / "weights" / "model.safetensors").is_file():
        directory = directory / "weights"
    return ShapesModel.load(directory, dtype=torch.float32)


def start_model(
    cfg: TrainConfig, model_cfg: ShapesConfig | None = None, device: torch.device | str = "cpu"
) -> ShapesModel:
    """The model a new run starts from, on ``device`` in training mode: ``cfg.init_from``'s weights changed as
    the stage asks (re-patched, word mixing dropped, prediction switched, neighbour maps added, in that
    order), or a new model of ``model_cfg`` (default: :class:`ShapesConfig`'s)."""
    if not cfg.init_from:
        if cfg.patch or cfg.prediction or cfg.drop_text_mixing or cfg.text_neighbours:
            raise ConceptAttentionError(
                "patch, prediction, drop_text_mixing and text_neighbours change init_from "
                "weights; a model from scratch takes them from its architecture"
            )
        return ShapesModel(model_cfg or ShapesConfig()).to(device).train()
    model = init_model(cfg.init_from).to(device).train()
    if cfg.patch:
        surgery.repatch(model, cfg.patch)
    if cfg.drop_text_mixing:
        surgery.drop_text_mixing(model)
    if cfg.prediction:
        surgery.predict_as(model, cfg.prediction)
    if cfg.text_neighbours:
        surgery.mix_text_neighbours(model)
    return model


def _plain(value, where: str = "checkpoint"):
    """``value`` as what ``torch.load(..., weights_only=True)`` reads back without running any pickled code:
    tensors, dicts with str/int keys, lists (tuples become lists), str, int, float, bool and None."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"{where} has keys other than str and int; a checkpoint holds only plain values")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}; a checkpoint holds only tensors and plain values")


def _optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict with plain values only (its ``betas`` tuple kept as a list)."""
    return _plain(opt.state_dict(), "opt")


def _load_optimizer_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load a state saved by :func:`_optimizer_state`, giving each setting back the type the optimiser uses."""
    current = opt.param_groups
    groups = []
    for i, group in enumerate(saved["param_groups"]):
        now = current[i] if i < len(current) else {}
        groups.append(
            {k: tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v for k, v in group.items()}
        )
    opt.load_state_dict({**saved, "param_groups": groups})


def _save_checkpoint(
    path: Path,
    model,
    ema,
    opt,
    step: int,
    cfg: TrainConfig,
    model_cfg: ShapesConfig,
    reader: torch.nn.Module | None = None,
) -> None:
    """Write ``path`` atomically; it holds only tensors and plain values (the configs as dicts, see
    :func:`_plain`), so :func:`load_checkpoint` reads it with ``weights_only=True``."""
    tmp = path.with_suffix(".tmp")
    # module state dicts stay as they are: ordered dicts of tensors, whose version metadata weights_only also reads
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": _optimizer_state(opt),
        "step": int(step),
        "train_config": _plain(asdict(cfg)),
        "model_config": _plain(asdict(model_cfg)),
    }
    if reader is not None:
        state["reader"] = reader.state_dict()
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint written by :func:`train`, read with ``weights_only=True`` (no pickled code is run)."""
    import pickle
    import re
    import zipfile

    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is cut short or foreign
        raise ConceptAttentionError(
            f"cannot read the checkpoint {path} (not a complete torch.save file); delete it to train from the start"
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it refers to {found.group(1)}" if found else "it holds pickled objects"
        raise ConceptAttentionError(
            f"{path} holds more than tensors and plain values, so it is not loaded ({what}); delete it to train "
            "from the start, or resume with the conceptattention version that wrote it"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConceptAttentionError(
            f"cannot read the checkpoint {path} ({first}); delete it to train from the start"
        ) from None


def check_resume(path: Path, saved: dict, cfg: TrainConfig) -> None:
    """A run resumes with the settings it was started with (the checkpoint's ``saved`` train config); only
    :data:`RESUMABLE_CHANGES` may differ. Anything else is one error naming the first settings that differ."""
    now = _plain(asdict(cfg))
    differ = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, "(not set)") != now[k]]
    if differ:
        shown = "; ".join(
            f"{k} {json.dumps(saved.get(k, '(not set)'))} there, {json.dumps(now[k])} now" for k in differ[:3]
        )
        raise ConceptAttentionError(
            f"{path} was trained with other settings ({shown}); resume with the stage "
            "config and --precision it was started with, or use a new --out"
        )


def _resumed_config(path: Path, saved: dict) -> ShapesConfig:
    try:
        return ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    except (TypeError, ConceptAttentionError) as err:
        raise ConceptAttentionError(
            f"{path} holds a model this version does not build ({err}); use a new --out"
        ) from None


def train(
    out: Path,
    cfg: TrainConfig | None = None,
    model_cfg: ShapesConfig | None = None,
    device: str = "cpu",
    progress: bool = True,
    max_seconds: float | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) into ``out``; returns the directory of the exported EMA weights.

    ``model_cfg`` is the architecture of a model from scratch (default: :class:`ShapesConfig`'s); a resumed
    run keeps the checkpoint's. ``max_seconds`` and ``stop_after`` (a step count) stop the run early, with a
    checkpoint, exported weights and a log record of the steps since the last one, keeping the learning-rate
    schedule of ``cfg.steps``; unlike a time limit, ``stop_after`` gives the same weights on any machine."""
    if stop_after is not None and stop_after < 1:
        raise ConceptAttentionError(f"stop_after is a step count, 1 or more, not {stop_after}")
    out = Path(out)
    cfg = cfg or TrainConfig()
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt, dev) if ckpt.is_file() else None
    if state is not None:  # resume: the checkpoint's architecture and settings
        check_resume(ckpt, state["train_config"], cfg)
        model = ShapesModel(_resumed_config(ckpt, state["model_config"])).to(dev).train()
    else:
        model = start_model(cfg, model_cfg, dev)
    model_cfg = model.config
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    reader = reader_heads(cfg, model)
    if reader is not None:
        reader = reader.to(dev)
    if dev.type == "cuda" and not cfg.bf16:
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 weights, TF32 matrix products
        torch.backends.cudnn.allow_tf32 = True
    trained = list(model.parameters()) + (list(reader.parameters()) if reader is not None else [])
    opt = torch.optim.AdamW(
        trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=dev.type == "cuda"
    )
    params, ema_params = list(model.parameters()), list(ema.parameters())
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if reader is not None:
            reader.load_state_dict(state["reader"])
        _load_optimizer_state(opt, state["opt"])
        start = state["step"]
        cfg = replace(cfg, steps=max(cfg.steps, start))

    stop = {"now": False}

    def request_stop(signum, frame):  # finish the step, checkpoint, exit
        stop["now"] = True

    out.mkdir(parents=True, exist_ok=True)  # once the model is built: a stage that cannot start leaves nothing
    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    log = (out / "log.jsonl").open("a")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train-shapes", unit="step")
    began, step, running, reading = time.time(), start, [], []
    mapping: dict[str, list[torch.Tensor]] = {"concepts": [], "coreference": []}

    def write_record(done: int) -> None:
        """One log line: the mean loss (and objectives) over the steps since the last line."""
        nonlocal running, reading
        mean = torch.stack(running).mean().item()
        record = {"step": done, "loss": mean, "lr": lr_at(done - 1, cfg), "seconds": time.time() - began}
        if reading:  # the reading objective's cross-entropy (the loss above includes it, weighted)
            each = torch.stack(reading).mean(0)
            record["reader"] = each.mean().item()
            if len(each) > 1:  # and per read block, in read_blocks order
                record["reader_each"] = [round(x, 5) for x in each.tolist()]
        for key, kept in mapping.items():  # the objectives on the maps, unweighted (the loss includes them)
            if kept:
                record[key] = torch.stack(kept).mean().item()
                kept.clear()
        running, reading = [], []
        log.write(json.dumps(record) + "\n")
        log.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}")

    try:
        last = cfg.steps if stop_after is None else min(cfg.steps, max(start, stop_after))  # a run past it: no step
        for step in range(start, last):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            parts: dict[str, torch.Tensor] = {}
            loss = batch_loss(model, step, cfg, dev, reader, parts)
            if "reader" in parts:
                reading.append(parts["reader_each"])
            for key, kept in mapping.items():
                if key in parts:
                    kept.append(parts[key])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                decay = min(cfg.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            running.append(loss.detach())  # no host sync per step: the GPU stays busy
            if bar is not None:
                bar.update(1)
            done = step + 1
            cut_short = (max_seconds is not None and time.time() - began > max_seconds) or (
                stop_after is not None and done >= stop_after
            )
            if done % cfg.log_every == 0 or ((stop["now"] or cut_short or done == cfg.steps) and running):
                write_record(done)
            if done % cfg.checkpoint_every == 0 or stop["now"] or cut_short or done == cfg.steps:
                _save_checkpoint(ckpt, model, ema, opt, done, cfg, model_cfg, reader)
                ema.save(out / "weights", extra={"steps": done, "train_config": asdict(cfg)})
            if stop["now"] or cut_short:
                break
    finally:
        log.close()
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return out / "weights"


def run_stage(
    config: Path,
    out: Path,
    device: str = "cpu",
    precision: str | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train the stage of the file ``config`` into ``out`` (``conceptattention train-shapes``), or resume it
    there; ``precision`` ("bf16" or "fp32") and ``stop_after`` override the stage's. Returns the exported
    weights' directory."""
    stage = load_stage(config)
    cfg = stage.cfg
    stop_after = stage.stop_after if stop_after is None else stop_after
    if precision is not None:
        if precision not in PRECISIONS:
            raise ConceptAttentionError(f"--precision must be {' or '.join(PRECISIONS)}, not {precision!r}")
        cfg = replace(cfg, bf16=precision == "bf16")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise ConceptAttentionError(f"max_seconds must be a positive number of seconds, not {max_seconds}")
    return train(out, cfg, device=device, progress=progress, max_seconds=max_seconds, stop_after=stop_after)
