"""Every supported diffusers MM-DiT pipeline, with ConceptAttention maps.

``generate`` runs the stock diffusers pipeline with the concept stream attached to its transformer,
so the image is exactly what the plain pipeline makes for the same seed. ``encode`` takes a real
image: VAE latents, noise at ``t`` for S noise draws batched in one call, and a transformer pass
that stops after the last block that is read.

Concepts are encoded each on its own, exactly as the pipeline encodes a prompt, by its own text
encoder; the default keeps the first token's embedding as in the paper, and
``concept_tokens="mean"`` averages over the word's tokens instead. What differs between models is
the family's (:mod:`conceptattention.families`); this module names none.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core import ConceptAttention, default_layers
from ..errors import ConceptAttentionError, short
from ..families import Family, family_for_pipeline
from ..families.base import call_default
from .base import MapsPipeline
from .images import batch_seeds, load_image, noise_samples, open_image, sum_word_tokens
from .options import check_number, check_seed, distinct_concepts
from .result import ConceptResult, result_from_maps, result_from_session, with_raw
from .video import VideoResult, load_video, resize_frames, video_result


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, cut short, with its type when the message is empty."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def load_diffusers(
    model: str, *, torch_dtype: torch.dtype | None = None, device: str | None = None, offload: str | None = None
) -> Any:
    """A diffusers pipeline from a hub id or local directory, with one clear error when unavailable."""
    from diffusers import DiffusionPipeline

    local = Path(model).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if local.is_dir():
        try:
            pipe = DiffusionPipeline.from_pretrained(str(local), **kwargs)
        except Exception as err:  # noqa: BLE001 - a damaged folder fails in many libraries' own error types
            raise ConceptAttentionError(
                f"could not load the diffusers model in {local} ({_first_line(err)}); check that the folder is a "
                "complete diffusers model (model_index.json and every component's config and weights), or pass "
                "'shapes' for the built-in model"
            ) from None
    elif local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConceptAttentionError(
            f"--model {short(model)} is neither a model folder nor a hub id (owner/name); give a diffusers model folder, "
            "a hub id (owner/name: see `conceptattention models`), or 'shapes'"
        )
    else:
        try:
            try:
                pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True, **kwargs)
            except (OSError, ValueError):
                if offline:
                    raise
                pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
        except Exception as err:  # noqa: BLE001 - hub, network and file errors all mean: not available here
            raise ConceptAttentionError(
                f"could not load the hub model {model!r} ({_first_line(err)}). Download it on a connected machine "
                f"(`hf download {model} --local-dir DIR`, after accepting the model's licence on the hub) and pass "
                "--model DIR, or 'shapes' for the built-in model"
            ) from None
    family_for_pipeline(pipe)
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    elif offload not in (None, "none"):
        raise ConceptAttentionError(f"offload must be 'model', 'sequential' or None, not {offload!r}")
    elif device is not None:
        pipe.to(device)
    return pipe


class MMDiTPipeline(MapsPipeline):
    """generate / encode / token_maps with maps for any supported diffusers pipeline."""

    options = frozenset({"height", "width", "size", "concept_tokens", "progress"})

    def __init__(self, pipe: Any, name: str | None = None) -> None:
        self.pipe = pipe
        self.model_family: Family = family_for_pipeline(pipe)
        self.model_family.check_pipeline(pipe)
        self.family = self.model_family.name
        self.name = name or getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
        self.default_t = self.model_family.default_t
        self.default_samples = self.model_family.default_samples
        if self.model_family.video:
            self.options = type(self).options | {"frames"}

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> MMDiTPipeline:
        return cls(load_diffusers(model, **kwargs), name=model)

    # ----- settings ---------------------------------------------------------------------------------
    @property
    def transformer(self) -> Any:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def default_layers(self) -> tuple[int, ...]:
        family = self.model_family
        return family.default_layers(self.transformer) or default_layers(len(family.double_blocks(self.transformer)))

    def _session(self, embeds, layers, readouts, calls=None, max_length: int = 256) -> ConceptAttention:
        """A session for concepts encoded with ``max_length`` (where the pipeline puts a lone word)."""
        chosen = list(layers) if layers else list(self.default_layers)
        return ConceptAttention(
            self.transformer,
            embeds,
            layers=chosen,
            readouts=list(readouts),
            calls=calls,
            family=self.model_family,
            concept_position=self.model_family.concept_position(self.pipe, max_length),
        )

    # ----- concepts --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_concepts(
        self, concepts: Sequence[str], concept_tokens: str = "first", max_length: int = 256
    ) -> torch.Tensor:
        """One embedding per concept ``[K, joint_attention_dim]``, each concept encoded on its own."""
        words = distinct_concepts(concepts)
        if concept_tokens not in ("first", "mean"):
            raise ConceptAttentionError(f"concept_tokens must be 'first' or 'mean', not {concept_tokens!r}")
        tokenizer, first = self.model_family.concept_tokenizer(self.pipe)
        counts = [len(tokenizer(w, add_special_tokens=False).input_ids) for w in words]
        empty = [w for w, n in zip(words, counts) if n == 0]
        if empty:
            raise ConceptAttentionError(f"these concepts tokenize to nothing: {empty!r}; use real words")
        many = [w for w, n in zip(words, counts) if n > 1]
        if many and concept_tokens == "first":
            warnings.warn(
                f"concepts {many} are several tokens; only the first token is used (the paper's choice). "
                "Pass concept_tokens='mean' to average over each word's tokens.",
                stacklevel=2,
            )
        embeds = self.model_family.token_states(self.pipe, words, max_length)  # [K, L, D]
        rows = []
        for k, n in enumerate(counts):
            span = embeds[k, first : first + (n if concept_tokens == "mean" else 1)]
            rows.append(span.mean(0))
        return torch.stack(rows)

    # ----- generate --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        concepts: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        layers: Sequence[int] | None = None,
        map_steps: Sequence[int] | None = None,
        readouts: Sequence[str] = ("concept_attention",),
        concept_tokens: str = "first",
        progress: bool = True,
        frames: int | None = None,
        **pipeline_kwargs: Any,
    ) -> Any:
        """Text -> image (a ConceptResult) or, for a video family, text -> video (a VideoResult, ``frames``
        frames), with the stock pipeline, plus one map per concept."""
        self.pipe.set_progress_bar_config(disable=not progress)
        max_length = int(pipeline_kwargs.get("max_sequence_length", 256))  # concepts padded as the prompt is
        embeds = self.encode_concepts(concepts, concept_tokens, max_length)
        kwargs: dict[str, Any] = dict(pipeline_kwargs)
        for key, value in (
            ("height", height),
            ("width", width),
            ("num_inference_steps", steps),
            (self.model_family.guidance_argument, guidance),
            (self.model_family.frames_argument, self._frames_option(frames)),
        ):
            if value is not None:
                kwargs[key] = value
        generator = torch.Generator(device="cpu").manual_seed(check_seed(seed))
        steps_taken = kwargs.get("num_inference_steps", call_default(self.pipe, "num_inference_steps"))
        calls = self._step_calls(kwargs, map_steps)
        began = time.perf_counter()
        session = self._session(embeds, layers, with_raw(readouts), calls=calls, max_length=max_length)
        video = self.model_family.video
        with session, _memory_error("the image or video"):
            output = self.pipe(prompt=prompt, generator=generator, output_type="np" if video else "pil", **kwargs)
        picture = _uint8_frames(output.frames[0]) if video else output.images[0]
        settings = {
            "model": self.name,
            "family": self.family,
            "mode": "generate",
            "prompt": prompt,
            "seed": seed,
            "steps": steps_taken,
            "guidance": kwargs.get(self.model_family.guidance_argument),
            "layers": list(session.layers),
            "map_steps": list(map_steps) if map_steps is not None else None,
            "concept_tokens": concept_tokens,
            "size": [int(picture.shape[2]), int(picture.shape[1])] if video else list(picture.size),
            "readout": list(readouts)[0],
            "seconds": round(time.perf_counter() - began, 3),
        }
        if video:
            index = self.model_family.prompt_batch_index
            maps = {name: m[index] for name, m in session.all_maps().items()}
            return video_result(
                picture,
                maps,
                list(concepts),
                {**settings, "frames": len(picture)},
                self.model_family.video_fps(self.pipe),
            )
        return result_from_session(
            picture, session, list(concepts), settings, batch_index=self.model_family.prompt_batch_index
        )

    def _frames_option(self, frames: int | None) -> int | None:
        if frames is None:
            return None
        if not self.model_family.video:
            raise ConceptAttentionError(f"frames only apply to video models; {self.name} makes images")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ConceptAttentionError(f"frames must be a whole number, at least 1, not {frames!r}")
        return frames

    def _video_pixels(
        self, source: Any, size: tuple[int, int] | None, frames: int | None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A video's pixels ``[3, T, H, W]`` in [0, 1], resized and cut to a frame count the VAE takes, and
        (W, H, the frames it had)."""
        from PIL import Image

        video = load_video(source)
        count = self.model_family.valid_frames(self.pipe, min(len(video), frames or len(video)))
        if count < 1:
            raise ConceptAttentionError(
                f"the video has {len(video)} frames, fewer than this model's VAE takes; give a longer video"
            )
        width, height = self._size(Image.fromarray(video[0]), size)
        return resize_frames(video[:count], (width, height)), (width, height, len(video))

    def _step_calls(self, kwargs: dict, map_steps: Sequence[int] | None):
        """Which transformer calls count: the steps asked for, never a separate negative-prompt pass."""
        per_step = self.model_family.calls_per_step(self.pipe, kwargs)
        wanted = None if map_steps is None else frozenset(int(s) for s in map_steps)
        return lambda call: call % per_step == 0 and (wanted is None or call // per_step in wanted)

    # ----- encode --------------------------------------------------------------------------------------
    def _size(self, image: Any, size: tuple[int, int] | None) -> tuple[int, int]:
        """(W, H): ``size``, or the image scaled so its longer side is the family's default, each side
        rounded to the nearest multiple the model takes."""
        multiple = self.model_family.size_multiple(self.pipe)
        wanted: tuple[float, float]
        if size is None:
            w, h = open_image(image).size
            scale = self.model_family.default_size(self.pipe) / max(w, h)
            wanted = (w * scale, h * scale)
        else:
            wanted = (float(size[0]), float(size[1]))
        w, h = (max(multiple, int(round(s / multiple)) * multiple) for s in wanted)
        return w, h

    @torch.no_grad()
    def encode(
        self,
        image: Any,
        concepts: Sequence[str],
        *,
        caption: str = "",
        t: float = 0.5,
        samples: int = 5,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        layers: Sequence[int] | None = None,
        readouts: Sequence[str] = ("concept_attention",),
        concept_tokens: str = "first",
        guidance: float | None = None,
        max_sequence_length: int = 256,
        frames: int | None = None,
    ) -> ConceptResult | VideoResult:
        """A real image -> maps (paper protocol: t = 0.5, 5 noise draws, averaged); for a video family, a real
        video (file, folder of frames or frames) -> maps through time, at most ``frames`` frames."""
        check_seed(seed)
        began = time.perf_counter()
        embeds = self.encode_concepts(concepts, concept_tokens, max_sequence_length)
        pixels, maps, (width, height, *given) = self._encode_one(
            image,
            embeds,
            caption,
            t=t,
            samples=samples,
            seed=seed,
            size=size,
            layers=layers,
            readouts=with_raw(readouts),
            guidance=guidance,
            max_sequence_length=max_sequence_length,
            frames=frames,
        )
        settings = {
            "model": self.name,
            "family": self.family,
            "mode": "encode",
            "caption": caption,
            "t": t,
            "samples": samples,
            "seed": seed,
            "size": [width, height],
            "layers": list(layers) if layers else list(self.default_layers),
            "concept_tokens": concept_tokens,
            "guidance": guidance,  # None: the pipeline's default scale
            "readout": list(readouts)[0],
            "seconds": round(time.perf_counter() - began, 3),
        }
        if self.model_family.video:
            video = _uint8_frames(pixels.permute(1, 2, 3, 0).cpu().numpy())
            settings.update(frames=len(video), frames_given=given[0])  # more given: cut to what the VAE takes
            return video_result(video, maps, list(concepts), settings, self.model_family.video_fps(self.pipe))
        from .shapes import to_pil

        return result_from_maps(to_pil(pixels), maps, list(concepts), settings)

    def _encode_one(
        self,
        image: Any,
        embeds: torch.Tensor,
        caption: str,
        *,
        t: float,
        samples: int,
        seed: int,
        size: tuple[int, int] | None,
        layers: Sequence[int] | None,
        readouts: Sequence[str],
        guidance: float | None,
        max_sequence_length: int,
        frames: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, ...]]:
        """One image's pixels, ``{readout: [K, h, w]}`` maps (mean over noise draws) and its (W, H)."""
        pixels, inputs, shape = self._noisy_inputs(
            image,
            caption,
            t=t,
            samples=samples,
            seed=seed,
            size=size,
            guidance=guidance,
            max_sequence_length=max_sequence_length,
            frames=frames,
        )
        with self._session(embeds, layers, readouts, max_length=max_sequence_length) as session:
            with _memory_error("the image or video"):
                session.forward_until_last_layer(**inputs)
        maps = {name: m.mean(0).float().cpu() for name, m in session.all_maps().items()}
        return pixels, maps, shape

    def _noisy_inputs(
        self,
        image: Any,
        caption: str,
        *,
        t: float,
        samples: int,
        seed: int,
        size: tuple[int, int] | None,
        guidance: float | None,
        max_sequence_length: int,
        frames: int | None = None,
    ) -> tuple[torch.Tensor, dict, tuple[int, ...]]:
        """Pixels, the transformer inputs of S noise draws at ``t`` (draw s from seed + s), and (W, H)."""
        check_number(t, "t", 0.0, 1.0)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConceptAttentionError(f"samples must be a whole number, at least 1, not {samples!r}")
        shape: tuple[int, ...]
        if self.model_family.video:
            pixels, shape = self._video_pixels(image, size, self._frames_option(frames))
        else:
            self._frames_option(frames)
            width, height = self._size(image, size)
            pixels = load_image(image, size=(width, height))
            shape = (width, height)
        latents = self.model_family.latents(self.pipe, pixels)  # [1, ...] as the sampler denoises them
        noise = noise_samples(latents.shape[1:], samples, seed).to(latents.device, latents.dtype)
        noisy = t * noise + (1 - t) * latents
        if guidance is None:  # a guidance-embedding model sees the scale its pipeline samples with by default
            guidance = float(call_default(self.pipe, self.model_family.guidance_argument) or 0.0)
        inputs = self.model_family.transformer_inputs(self.pipe, noisy, t, caption, guidance, max_sequence_length)
        return pixels, inputs, shape

    def word_positions(self, caption: str, concept: str, max_sequence_length: int = 256) -> list[int]:
        """Indices in the transformer's text sequence of the tokens of ``concept``'s occurrences in
        ``caption`` (whole words, case-insensitive; several-word concepts match consecutive words)."""
        tokenizer, start, limit = self.model_family.prompt_tokenizer(self.pipe, max_sequence_length, caption)
        words = caption.split()
        counts = self.model_family.caption_token_counts(tokenizer, words)
        starts = [start + sum(counts[:i]) for i in range(len(words))]

        def norm(w: str) -> str:
            return w.strip(".,;:!?\"'()").lower()

        target, normed = [norm(w) for w in concept.split()], [norm(w) for w in words]
        positions: list[int] = []
        for i in range(len(words) - len(target) + 1):
            if normed[i : i + len(target)] == target:
                for j in range(i, i + len(target)):
                    positions += [p for p in range(starts[j], starts[j] + counts[j]) if p < limit]
        return positions

    @torch.no_grad()
    def prompt_maps(
        self,
        images: Sequence[Any],
        concepts: Sequence[str],
        captions: Sequence[str],
        *,
        t: float = 0.5,
        samples: int = 5,
        seeds: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        size: tuple[int, int] | None = None,
        concept_tokens: str = "first",
        guidance: float | None = None,
        max_sequence_length: int = 256,
        frames: int | None = None,
    ) -> torch.Tensor:
        """DAAM-style maps ``[B, K, h, w]``: image-to-prompt attention summed over each concept's tokens in
        its caption (all zero for a concept the caption does not contain). ``concept_tokens`` is unused."""
        from ..prompt_attention import PromptAttention

        seeds = batch_seeds(images, captions, seeds)
        words = [str(c).strip() for c in concepts]
        if not words:
            raise ConceptAttentionError("the concept list is empty: pass at least one concept")
        chosen = list(layers) if layers else list(self.default_layers)
        out = []
        for image, caption, seed in zip(images, captions, seeds):
            _, inputs, _ = self._noisy_inputs(
                image,
                caption,
                t=t,
                samples=samples,
                seed=int(seed),
                size=size,
                guidance=guidance,
                max_sequence_length=max_sequence_length,
                frames=frames,
            )
            with PromptAttention(self.transformer, layers=chosen) as session:
                session.forward_until_last_layer(**inputs)
            per_token = session.maps().mean(0).float().cpu()  # [S_text, h, w]
            out.append(
                sum_word_tokens(per_token, [self.word_positions(caption, w, max_sequence_length) for w in words])
            )
        try:
            return torch.stack(out)
        except RuntimeError:
            raise ConceptAttentionError("these images give different token grids; pass size=(W, H)") from None

    @torch.no_grad()
    def token_maps(
        self,
        images: Sequence[Any],
        concepts: Sequence[str],
        captions: Sequence[str],
        *,
        readouts: Sequence[str] = ("concept_attention",),
        t: float = 0.5,
        samples: int = 5,
        seeds: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        size: tuple[int, int] | None = None,
        concept_tokens: str = "first",
        guidance: float | None = None,
        max_sequence_length: int = 256,
        frames: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``encode`` for several images (one pass each): ``{readout: [B, K, h, w]}`` float32 on the CPU.

        Images must give the same token grid (pass ``size`` for images of different shapes).
        """
        seeds = batch_seeds(images, captions, seeds)
        embeds = self.encode_concepts(concepts, concept_tokens, max_sequence_length)
        per_image = [
            self._encode_one(
                im,
                embeds,
                cap,
                t=t,
                samples=samples,
                seed=int(sd),
                size=size,
                layers=layers,
                readouts=readouts,
                guidance=guidance,
                max_sequence_length=max_sequence_length,
                frames=frames,
            )[1]
            for im, cap, sd in zip(images, captions, seeds)
        ]
        try:
            return {name: torch.stack([m[name] for m in per_image]) for name in per_image[0]}
        except RuntimeError:
            raise ConceptAttentionError("these images give different token grids; pass size=(W, H)") from None


def _uint8_frames(frames: Any) -> Any:
    """Frames ``[T, H, W, 3]`` as the pipeline returns them (floats in [0, 1], or uint8) -> uint8."""
    import numpy as np

    array = np.asarray(frames)
    return array if array.dtype == np.uint8 else (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


@contextlib.contextmanager
def _memory_error(what: str) -> Iterator[None]:
    """An out-of-memory error of the device as one clear error (the hooks are gone by then)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise ConceptAttentionError(
            f"{what} is too large for this device (out of memory); pass a smaller size"
            + (" or fewer frames" if "video" in what else "")
            + ", or another --device"
        ) from None
