"""Training of the shapes model: rectified flow on freshly generated shapes-world batches.

Reproducible from (config, seed): the batch of step s is ``sample_scenes(batch, seed=data_seed(s))``
and the noise/timesteps of step s come from a generator seeded by (seed, s), so a resumed run sees
exactly what an uninterrupted run would. Checkpoints (model, EMA, optimiser, step) are written
atomically every ``checkpoint_every`` steps and on interruption; ``train`` resumes from the last one.
A checkpoint holds only tensors and plain values (the configs as dicts), and is read back with
``torch.load(..., weights_only=True)``, which runs no pickled code.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core import ConceptAttention, default_layers
from ..errors import ConceptAttentionError
from ..readouts import layer_scores
from . import world
from .model import PREDICTIONS, ShapesConfig, ShapesModel, pack

HELDOUT_SEED = 20250204  # the benchmark's seed; training seeds are derived to never equal it


@dataclass
class TrainConfig:
    steps: int = 3800
    batch: int = 64
    lr: float = 6e-4
    warmup: int = 300
    weight_decay: float = 0.0
    ema: float = 0.999
    seed: int = 0
    caption_dropout: float = 0.1
    single_word_rate: float = 0.15
    colorless_rate: float = 0.0  # share of captions naming shapes without colours (world.captions)
    multi_object_rate: float = 0.0  # share of each batch asking for 2-3 objects (the rest: 1-3, as the benchmark)
    t_mean: float = 0.3  # logit-normal timestep sampling, tilted towards noise (layout)
    t_std: float = 1.0
    t_uniform: float = 0.0  # share of timesteps drawn uniformly instead (covers the low-noise end too)
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast (CPU with AMX, CUDA); False: float32 (TF32 matrix products on CUDA)
    checkpoint_every: int = 200
    log_every: int = 20
    init_from: str = ""  # start from these weights ("shapes" = the shipped model, or a weights directory)
    object_weight: float = 1.0  # loss weight of pixels on or within 2 px of an object (background: 1)
    prediction: str = ""  # "velocity" or "sample": what the transformer outputs ("": keep the weights' own)
    patch: int = 0  # with init_from: re-patch those weights to this patch size (ShapesModel.repatch; 0: keep)
    drop_text_mixing: bool = False  # remove the text encoder's layers before training (ShapesModel.drop_text_mixing)
    text_positions: bool = False  # give prompt tokens RoPE positions before training (ShapesConfig.text_positions)
    text_neighbours: bool = False  # let prompt tokens add their neighbouring words (ShapesConfig.text_neighbours)
    drop_next_word: bool = False  # keep only the previous word's map (ShapesModel.drop_next_word)
    reader_weight: float = 0.0  # weight of the reading objective (reader_targets; 0: plain denoising)
    reader_t_max: float = 0.8  # the reading objective only counts images noised at most this much
    reader_blocks: tuple[int, ...] = ()  # double-stream blocks whose text output is read (reader_heads; (): the last)
    reader_at: str = "block"  # what is read there: "block" (the text stream as the block leaves it) or "attention"
    concept_weight: float = 0.0  # weight of the image-label objective on the maps (true_concept_loss; 0: off)
    concept_t_max: float = 0.8  # that objective only counts images noised at most this much
    concept_blocks: tuple[int, ...] = ()  # double-stream blocks whose maps it scores ((): the model's map layers)
    coreference_weight: float = 0.0  # weight of the co-reference objective on the maps (coreference_loss; 0: off)


PRECISIONS = ("auto", "bf16", "fp32")


def use_bf16(precision: str, device: str) -> bool:
    """bf16 autocast or float32 for a precision name; ``auto`` is bf16 on CPU (AMX), float32 (TF32) on CUDA."""
    if precision not in PRECISIONS:
        raise ConceptAttentionError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and not device.startswith("cuda"))


def data_seed(seed: int, step: int) -> int:
    value = 1_000_003 * (seed + 1) + step
    return value + 1 if value == HELDOUT_SEED else value


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
    if multi == 0:  # the older configurations' batches, unchanged
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
    find its own object among the image tokens: the shape word's query learns to look where its shape
    is, which is what a shape concept encoded alone needs for ConceptAttention. No mask is used.
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


#: What the reading objective reads at a block: the text stream as the block leaves it, or the text tokens'
#: attention outputs (before the output projection: for a concept, the vector ConceptAttention compares).
READ_AT = ("block", "attention")


def read_blocks(cfg: TrainConfig, model: ShapesModel) -> list[int]:
    """The double-stream blocks whose text output the reading objective reads, in order: ``cfg.reader_blocks``
    (negative indices count from the end), or the last block when none are named."""
    if cfg.reader_at not in READ_AT:
        raise ConceptAttentionError(f"the reading objective reads {' or '.join(READ_AT)}, not {cfg.reader_at!r}")
    n = len(model.transformer.transformer_blocks)
    return _double_blocks(model, [int(b) for b in cfg.reader_blocks] or [n - 1], "reader")


def _double_blocks(model: ShapesModel, named: list[int], what: str) -> list[int]:
    """``named`` double-stream blocks (negative indices count from the end), sorted, each once; a block the
    model does not have is an error naming ``what`` asked for it."""
    n = len(model.transformer.transformer_blocks)
    bad = [b for b in named if not -n <= b < n]
    if bad:
        raise ConceptAttentionError(f"{what} blocks {bad} are not double-stream blocks of this model; it has {n} "
                                    f"(0 to {n - 1}, or -1 for the last)")
    return sorted({b % n for b in named})


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
                    states.setdefault(b, args[0])    # stream in the same pass projects its concepts after it
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

    def _accumulate(self, image_out, concept_out, image_value, image_key, step) -> None:
        k = self.num_concepts
        self.scores.append(layer_scores("output", image_out=image_out, concept_out=concept_out[:, :k],
                                        image_value=image_value, concept_value=step.value[:, :, :k],
                                        image_key=image_key, concept_query=step.query[:, :, :k]))


def concept_blocks(cfg: TrainConfig, model: ShapesModel) -> list[int]:
    """The double-stream blocks whose maps the objectives on the maps (image labels, co-reference) score:
    ``cfg.concept_blocks``, or the model's own map layers (those ConceptAttention reads by default)."""
    n = len(model.transformer.transformer_blocks)
    named = [int(b) for b in cfg.concept_blocks] or list(model.config.map_layers or default_layers(n))
    return _double_blocks(model, named, "concept")


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
    (``true`` ``[B, K]``, :func:`world.true_concepts`) should hold the softmax over concepts between them,
    so that no absent word takes pixels (``blue`` the background of a gray image, say). Per block, the mean
    over tokens of ``-log`` (the true concepts' summed share), averaged over blocks and over the images in
    ``asked`` ``[B]``. It uses which words are true of an image, never where: which true word takes which
    token is left to the model. Zero (with a graph) when no image is asked."""
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
    :func:`world.coreferent_concepts`: what the caption says, no mask) should have the same map, so neither
    takes all of the softmax where the other is as true. At each image token, the pair's split of their joint
    share, ``sigmoid(d_1 - d_2)`` for their scores ``d``, is scored against an even split (binary
    cross-entropy minus its floor ``log 2``: zero for equal scores, about half the gap for a large one),
    weighted by the pair's joint share (where the pair holds the softmax); the weighted mean per pair,
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


def batch_loss(model: ShapesModel, step: int, cfg: TrainConfig, device: torch.device,
               reader: torch.nn.ModuleList | None = None, parts: dict | None = None) -> torch.Tensor:
    """The step's loss; with ``reader`` (:func:`reader_heads`), plus the reading objective: its cross-entropy,
    averaged over the read blocks, goes to ``parts["reader"]`` and each block's to ``parts["reader_each"]``."""
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
    if cfg.t_uniform > 0:  # drawn only when asked for, so older configurations see the same numbers
        uniform = torch.rand(cfg.batch, generator=g)
        t = torch.where(torch.rand(cfg.batch, generator=g) < cfg.t_uniform, uniform, t)
    t = t.to(device)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    blocks = read_blocks(cfg, model) if reader is not None else []
    if reader is not None and len(blocks) != len(reader):
        raise ConceptAttentionError(f"{len(reader)} reader heads for {len(blocks)} read blocks ({blocks})")
    scored = concept_blocks(cfg, model) if cfg.concept_weight > 0 or cfg.coreference_weight > 0 else []
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
    around them (where a shape's outline is decided), 1 on the background."""
    near = torch.nn.functional.max_pool2d((labels > 0).float()[:, None], kernel_size=5, stride=1, padding=2)
    weights = 1.0 + (object_weight - 1.0) * near
    return pack(weights.expand(-1, 3, -1, -1).contiguous(), patch)


def init_model(source: str) -> ShapesModel:
    """Float32 copy of existing weights to continue training from: "shapes" or a weights directory."""
    directory = Path(__file__).resolve().parent / "weights" if source == "shapes" else Path(source)
    if (directory / "weights" / "model.safetensors").is_file():
        directory = directory / "weights"
    return ShapesModel.load(directory, dtype=torch.float32)


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
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v
                       for k, v in group.items()})
    opt.load_state_dict({**saved, "param_groups": groups})


def _save_checkpoint(path: Path, model, ema, opt, step: int, cfg: TrainConfig, model_cfg: ShapesConfig,
                     reader: torch.nn.Module | None = None) -> None:
    """Write ``path`` atomically; it holds only tensors and plain values (the configs as dicts, see
    :func:`_plain`), so :func:`load_checkpoint` reads it with ``weights_only=True``."""
    tmp = path.with_suffix(".tmp")
    # module state dicts stay as they are: ordered dicts of tensors, whose version metadata weights_only also reads
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": _optimizer_state(opt),
             "step": int(step), "train_config": _plain(asdict(cfg)), "model_config": _plain(asdict(model_cfg))}
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
        raise ConceptAttentionError(f"cannot read the checkpoint {path} (not a complete torch.save file); delete it "
                                    "to train from the start")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it refers to {found.group(1)}" if found else "it holds pickled objects"
        raise ConceptAttentionError(
            f"{path} holds more than tensors and plain values, so it is not loaded ({what}); delete it to train "
            "from the start, or resume with the conceptattention version that wrote it") from None
    except (RuntimeError, EOFError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConceptAttentionError(f"cannot read the checkpoint {path} ({first}); delete it to train from the "
                                    "start") from None


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

    ``max_seconds`` and ``stop_after`` (a step count) stop the run early, with a checkpoint and exported
    weights, keeping the learning-rate schedule of ``cfg.steps``; unlike a time limit, ``stop_after`` gives the
    same weights on any machine."""
    if stop_after is not None and stop_after < 1:
        raise ConceptAttentionError(f"stop_after is a step count, 1 or more, not {stop_after}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or TrainConfig()
    model_cfg = model_cfg or ShapesConfig()
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt, dev) if ckpt.is_file() else None
    if state is not None:  # resume: the checkpoint's architecture wins
        model_cfg = ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in state["model_config"].items()})
        model = ShapesModel(model_cfg).to(dev).train()
    elif cfg.init_from:
        model = init_model(cfg.init_from).to(dev).train()
        model_cfg = model.config
    else:
        model = ShapesModel(model_cfg).to(dev).train()
    if state is None and cfg.patch and cfg.patch != model_cfg.patch:
        if not cfg.init_from:
            raise ConceptAttentionError("TrainConfig.patch re-patches --init-from weights; a model from scratch takes "
                                        "its patch size from its architecture")
        model.repatch(cfg.patch)
        model_cfg = model.config
    if state is None and cfg.drop_text_mixing:
        model.drop_text_mixing()
        model_cfg = model.config
    if state is None and cfg.prediction:
        model.predict_as(cfg.prediction)
        model_cfg = model.config
    if state is None and cfg.text_positions:
        model.order_text_positions()
        model_cfg = model.config
    if state is None and cfg.text_neighbours:
        model.mix_text_neighbours()
        model_cfg = model.config
    if state is None and cfg.drop_next_word:
        model.drop_next_word()
        model_cfg = model.config
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    reader = reader_heads(cfg, model)
    if reader is not None:
        reader = reader.to(dev)
    if dev.type == "cuda" and not cfg.bf16:
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 weights, TF32 matrix products
        torch.backends.cudnn.allow_tf32 = True
    trained = list(model.parameters()) + (list(reader.parameters()) if reader is not None else [])
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                            fused=dev.type == "cuda")
    params, ema_params = list(model.parameters()), list(ema.parameters())
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if (reader is None) != ("reader" not in state):
            raise ConceptAttentionError(
                f"{ckpt} was {'not ' if 'reader' not in state else ''}trained with the reading objective; resume "
                f"with the same --reader-weight setting (it was {state['train_config'].get('reader_weight', 0.0)})")
        if reader is not None:
            saved = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in TrainConfig.__dataclass_fields__})
            before, now = read_blocks(saved, model), read_blocks(cfg, model)
            if before != now:
                raise ConceptAttentionError(f"{ckpt} read the text stream at blocks {before}; resume with the same "
                                            f"--reader-block options (asked: {now})")
            if saved.reader_at != cfg.reader_at:
                raise ConceptAttentionError(f"{ckpt} read the text stream's {saved.reader_at} outputs; resume with "
                                            f"the same --reader-at (asked: {cfg.reader_at})")
            heads = state["reader"]
            if "weight" in heads:  # a checkpoint from before reader_blocks kept its one head bare
                heads = {f"0.{k}": v for k, v in heads.items()}
            reader.load_state_dict(heads)
        _load_optimizer_state(opt, state["opt"])
        start = state["step"]
        cfg = TrainConfig(**{**asdict(cfg), "steps": max(cfg.steps, start)})

    stop = {"now": False}

    def request_stop(signum, frame):  # finish the step, checkpoint, exit
        stop["now"] = True

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    log = (out / "log.jsonl").open("a")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train-shapes", unit="step")
    began, step, running, reading = time.time(), start, [], []
    mapping: dict[str, list[torch.Tensor]] = {"concepts": [], "coreference": []}
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
            if (step + 1) % cfg.log_every == 0:
                mean = torch.stack(running).mean().item()
                record = {"step": step + 1, "loss": mean, "lr": lr_at(step, cfg), "seconds": time.time() - began}
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
            done = step + 1
            cut_short = (max_seconds is not None and time.time() - began > max_seconds) or (
                stop_after is not None and done >= stop_after)
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


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train the shapes model (resumes from OUT/checkpoint.pt).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--init-from", default="")
    p.add_argument("--object-weight", type=float, default=TrainConfig.object_weight)
    p.add_argument("--t-uniform", type=float, default=TrainConfig.t_uniform)
    p.add_argument("--prediction", choices=PREDICTIONS, default="")
    p.add_argument("--patch", type=int, default=0, help="with --init-from: re-patch those weights to this size")
    p.add_argument("--colorless-rate", type=float, default=TrainConfig.colorless_rate)
    p.add_argument("--multi-object-rate", type=float, default=TrainConfig.multi_object_rate)
    p.add_argument("--drop-text-mixing", action="store_true", help="remove the text encoder's transformer layers")
    p.add_argument("--text-positions", action="store_true", help="give prompt tokens RoPE positions (word order)")
    p.add_argument("--text-neighbours", action="store_true",
                   help="let each prompt token add maps of the words beside it (colour-shape binding)")
    p.add_argument("--drop-next-word", action="store_true",
                   help="keep only the map of the word before each prompt token (the shape word carries the binding)")
    p.add_argument("--reader-weight", type=float, default=TrainConfig.reader_weight,
                   help="weight of the reading objective: in captions without colours, each shape word's token "
                        "names its object's colour from the image (0: off)")
    p.add_argument("--reader-blocks", type=int, nargs="+", default=[],
                   help="double-stream blocks whose text output is read (default: the last)")
    p.add_argument("--reader-at", choices=READ_AT, default=TrainConfig.reader_at,
                   help="read the text stream as the block leaves it, or its attention outputs")
    p.add_argument("--concept-weight", type=float, default=TrainConfig.concept_weight,
                   help="weight of the image-label objective on the maps: at every image token, the concept words "
                        "true of the image must hold ConceptAttention's softmax over concepts (0: off)")
    p.add_argument("--concept-blocks", type=int, nargs="+", default=[],
                   help="double-stream blocks whose maps it scores (default: the model's map layers)")
    p.add_argument("--coreference-weight", type=float, default=TrainConfig.coreference_weight,
                   help="weight of the co-reference objective on the maps: words that name the same pixels (an "
                        "object's colour and shape, the scene and 'background') must score every image token alike")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps, keeping the learning-rate schedule of --steps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CPU, float32 with TF32 on CUDA")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    bf16 = use_bf16(a.precision, a.device)
    cfg = TrainConfig(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, warmup=a.warmup, init_from=a.init_from,
                      object_weight=a.object_weight, t_uniform=a.t_uniform, bf16=bf16,
                      prediction=a.prediction, patch=a.patch, colorless_rate=a.colorless_rate,
                      multi_object_rate=a.multi_object_rate,
                      drop_text_mixing=a.drop_text_mixing, text_positions=a.text_positions,
                      text_neighbours=a.text_neighbours, drop_next_word=a.drop_next_word,
                      reader_weight=a.reader_weight, reader_blocks=tuple(a.reader_blocks),
                      reader_at=a.reader_at, concept_weight=a.concept_weight,
                      concept_blocks=tuple(a.concept_blocks), coreference_weight=a.coreference_weight)
    train(a.out, cfg, device=a.device, max_seconds=a.max_seconds, stop_after=a.stop_after)


if __name__ == "__main__":
    main()
