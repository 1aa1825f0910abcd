"""FLUX.1 and SD3/SD3.5 through diffusers' own pipelines, with ConceptAttention maps.

``generate`` runs the stock ``FluxPipeline`` / ``StableDiffusion3Pipeline`` with the concept stream
attached to its transformer, so the image is exactly what the plain pipeline makes for the same
seed. ``encode`` takes a real image: VAE latents, noise at ``t`` for S noise draws batched in one
call, and a transformer pass that stops after the last block that is read.

Concepts are encoded each on its own, exactly as the pipeline encodes a prompt, by the model's T5
encoder (SD3 without T5: its two CLIP encoders); the default keeps the first token's embedding as
in the paper, and ``concept_tokens="mean"`` averages over the word's tokens instead.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core import ConceptAttention
from ..errors import ConceptAttentionError, UnsupportedModelError, short
from .images import batch_seeds, load_image, noise_samples, open_image, sum_word_tokens
from .options import check_number, check_seed, distinct_concepts
from .result import ConceptResult, result_from_maps, result_from_session, with_raw

#: Paper defaults (FLUX.1-schnell protocol: double blocks 14-17, t = 0.5, 5 noise samples).
FLUX_LAYERS = (14, 15, 16, 17)


def _family(pipe: Any) -> str:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if isinstance(pipe, FluxPipeline):
        return "flux"
    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    raise UnsupportedModelError(
        f"{type(pipe).__name__} is not supported; use a FLUX.1 (FluxPipeline) or SD3/SD3.5 (StableDiffusion3Pipeline) model"
    )


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
            "a hub id such as black-forest-labs/FLUX.1-schnell, or 'shapes'"
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
    _family(pipe)
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    elif offload not in (None, "none"):
        raise ConceptAttentionError(f"offload must be 'model', 'sequential' or None, not {offload!r}")
    elif device is not None:
        pipe.to(device)
    return pipe


class MMDiTPipeline:
    """generate / encode with maps for a diffusers FluxPipeline or StableDiffusion3Pipeline."""

    def __init__(self, pipe: Any, name: str | None = None) -> None:
        self.pipe = pipe
        self.family = _family(pipe)
        self.name = name or getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> MMDiTPipeline:
        return cls(load_diffusers(model, **kwargs), name=model)

    # ----- settings ---------------------------------------------------------------------------------
    @property
    def transformer(self) -> Any:  # a diffusers FluxTransformer2DModel / SD3Transformer2DModel
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    #: The paper's real-image protocol: noise at t = 0.5, 5 noise draws averaged.
    default_t: float = 0.5
    default_samples: int = 5

    @property
    def default_layers(self) -> tuple[int, ...]:
        n = len(self.transformer.transformer_blocks)
        if self.family == "flux" and n == 19:
            return FLUX_LAYERS
        from ..core import default_layers

        return default_layers(n)

    def _session(self, embeds, layers, readouts, calls=None) -> ConceptAttention:
        chosen = list(layers) if layers else list(self.default_layers)
        return ConceptAttention(self.transformer, embeds, layers=chosen, readouts=list(readouts), calls=calls)

    # ----- concepts --------------------------------------------------------------------------------
    def _concept_tokenizer(self) -> tuple[Any, int]:
        """The tokenizer whose encoder gives concept embeddings, and the index of a word's first token."""
        if self.family == "sd3" and getattr(self.pipe, "text_encoder_3", None) is None:
            return self.pipe.tokenizer, 1  # CLIP: position 0 is the start token
        return (self.pipe.tokenizer_2 if self.family == "flux" else self.pipe.tokenizer_3), 0

    @torch.no_grad()
    def encode_concepts(
        self, concepts: Sequence[str], concept_tokens: str = "first", max_length: int = 256
    ) -> torch.Tensor:
        """One embedding per concept ``[K, joint_attention_dim]``, each concept encoded on its own."""
        words = distinct_concepts(concepts)
        if concept_tokens not in ("first", "mean"):
            raise ConceptAttentionError(f"concept_tokens must be 'first' or 'mean', not {concept_tokens!r}")
        tokenizer, first = self._concept_tokenizer()
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
        embeds = self._token_states(words, max_length)  # [K, L, D]
        rows = []
        for k, n in enumerate(counts):
            span = embeds[k, first : first + (n if concept_tokens == "mean" else 1)]
            rows.append(span.mean(0))
        return torch.stack(rows)

    def _token_states(self, words: list[str], max_length: int) -> torch.Tensor:
        """Per-token text-encoder states ``[K, L, D]`` of each word encoded as a prompt."""
        pipe, device = self.pipe, self.device
        if self.family == "flux":
            return pipe._get_t5_prompt_embeds(prompt=words, max_sequence_length=max_length, device=device)
        if getattr(pipe, "text_encoder_3", None) is not None:
            return pipe._get_t5_prompt_embeds(prompt=words, max_sequence_length=max_length, device=device)
        clip_l, _ = pipe._get_clip_prompt_embeds(prompt=words, device=device, clip_model_index=0)
        clip_g, _ = pipe._get_clip_prompt_embeds(prompt=words, device=device, clip_model_index=1)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        width = self.transformer.config.joint_attention_dim
        return F.pad(clip, (0, width - clip.shape[-1]))

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
        **pipeline_kwargs: Any,
    ) -> ConceptResult:
        """Text -> image with the stock pipeline, plus one map per concept for the generated image."""
        self.pipe.set_progress_bar_config(disable=not progress)
        embeds = self.encode_concepts(concepts, concept_tokens)
        kwargs: dict[str, Any] = dict(pipeline_kwargs)
        for key, value in (
            ("height", height),
            ("width", width),
            ("num_inference_steps", steps),
            ("guidance_scale", guidance),
        ):
            if value is not None:
                kwargs[key] = value
        generator = torch.Generator(device="cpu").manual_seed(check_seed(seed))
        steps_taken = kwargs.get("num_inference_steps", 28)
        calls = self._step_calls(kwargs, map_steps)
        began = time.perf_counter()
        session = self._session(embeds, layers, with_raw(readouts), calls=calls)
        with session:
            image = self.pipe(prompt, generator=generator, output_type="pil", **kwargs).images[0]
        settings = {
            "model": self.name,
            "family": self.family,
            "mode": "generate",
            "prompt": prompt,
            "seed": seed,
            "steps": steps_taken,
            "guidance": kwargs.get("guidance_scale"),
            "layers": list(session.layers),
            "map_steps": list(map_steps) if map_steps is not None else None,
            "concept_tokens": concept_tokens,
            "size": list(image.size),
            "readout": list(readouts)[0],
            "seconds": round(time.perf_counter() - began, 3),
        }
        # SD3 with guidance > 1 batches [unconditional, conditional]: the last item is the prompt's
        return result_from_session(image, session, list(concepts), settings, batch_index=-1)

    def _step_calls(self, kwargs: dict, map_steps: Sequence[int] | None):
        """Which transformer calls count: the steps asked for, never a true-CFG negative pass (Flux)."""
        per_step = 1
        if self.family == "flux" and kwargs.get("true_cfg_scale", 1.0) > 1 and kwargs.get("negative_prompt"):
            per_step = 2  # the pipeline calls the transformer for the prompt, then for the negative prompt
        wanted = None if map_steps is None else frozenset(int(s) for s in map_steps)
        return lambda call: call % per_step == 0 and (wanted is None or call // per_step in wanted)

    # ----- encode --------------------------------------------------------------------------------------
    def _size(self, image: Any, size: tuple[int, int] | None) -> tuple[int, int]:
        multiple = self.pipe.vae_scale_factor * 2
        if size is None:
            w, h = open_image(image).size
            target = self.pipe.default_sample_size * self.pipe.vae_scale_factor
            scale = target / max(w, h)
            size = (w * scale, h * scale)
        w, h = (max(multiple, int(round(s / multiple)) * multiple) for s in size)
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
        guidance: float = 0.0,
        max_sequence_length: int = 256,
    ) -> ConceptResult:
        """A real image -> maps (paper protocol: t = 0.5, 5 noise draws, averaged)."""
        check_seed(seed)
        began = time.perf_counter()
        embeds = self.encode_concepts(concepts, concept_tokens, max_sequence_length)
        pixels, maps, (width, height) = self._encode_one(
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
            "readout": list(readouts)[0],
            "seconds": round(time.perf_counter() - began, 3),
        }
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
        guidance: float,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, int]]:
        """One image's pixels, ``{readout: [K, h, w]}`` maps (mean over noise draws) and its (W, H)."""
        pixels, inputs, size = self._noisy_inputs(
            image,
            caption,
            t=t,
            samples=samples,
            seed=seed,
            size=size,
            guidance=guidance,
            max_sequence_length=max_sequence_length,
        )
        with self._session(embeds, layers, readouts) as session:
            session.forward_until_last_layer(**inputs)
        maps = {name: m.mean(0).float().cpu() for name, m in session.all_maps().items()}
        return pixels, maps, size

    def _noisy_inputs(
        self,
        image: Any,
        caption: str,
        *,
        t: float,
        samples: int,
        seed: int,
        size: tuple[int, int] | None,
        guidance: float,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, dict, tuple[int, int]]:
        """Pixels, the transformer inputs of S noise draws at ``t`` (draw s from seed + s), and (W, H)."""
        check_number(t, "t", 0.0, 1.0)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConceptAttentionError(f"samples must be a whole number, at least 1, not {samples!r}")
        width, height = self._size(image, size)
        pixels = load_image(image, size=(width, height))
        latents = self._latents(pixels)  # [1, C, h, w] scaled
        noise = noise_samples(latents.shape[1:], samples, seed).to(latents.device, latents.dtype)
        noisy = t * noise + (1 - t) * latents
        return pixels, self._transformer_inputs(noisy, t, caption, guidance, max_sequence_length), (width, height)

    def _prompt_tokenizer(self) -> tuple[Any, int]:
        """The tokenizer of the prompt tokens image queries see, and where its tokens start in the
        transformer's text sequence (SD3: after the 77 CLIP tokens; CLIP alone: after its start token)."""
        if self.family == "flux":
            return self.pipe.tokenizer_2, 0
        if getattr(self.pipe, "text_encoder_3", None) is not None:
            return self.pipe.tokenizer_3, self.pipe.tokenizer_max_length
        return self.pipe.tokenizer, 1

    def word_positions(self, caption: str, concept: str, max_sequence_length: int = 256) -> list[int]:
        """Indices in the transformer's text sequence of the tokens of ``concept``'s occurrences in
        ``caption`` (whole words, case-insensitive; several-word concepts match consecutive words)."""
        tokenizer, start = self._prompt_tokenizer()
        words = caption.split()
        counts = [len(tokenizer(w, add_special_tokens=False).input_ids) for w in words]
        starts = [start + sum(counts[:i]) for i in range(len(words))]

        def norm(w: str) -> str:
            return w.strip(".,;:!?\"'()").lower()

        target, normed = [norm(w) for w in concept.split()], [norm(w) for w in words]
        clip_only = self.family == "sd3" and getattr(self.pipe, "text_encoder_3", None) is None
        limit = self.pipe.tokenizer_max_length - 1 if clip_only else start + max_sequence_length  # truncation
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
        guidance: float = 0.0,
        max_sequence_length: int = 256,
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
        guidance: float = 0.0,
        max_sequence_length: int = 256,
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
            )[1]
            for im, cap, sd in zip(images, captions, seeds)
        ]
        try:
            return {name: torch.stack([m[name] for m in per_image]) for name in per_image[0]}
        except RuntimeError:
            raise ConceptAttentionError("these images give different token grids; pass size=(W, H)") from None

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        x = (pixels[None] * 2 - 1).to(self.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def _transformer_inputs(
        self, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_sequence_length: int
    ) -> dict:
        pipe, s = self.pipe, noisy.shape[0]
        dtype = self.transformer.dtype
        if self.family == "flux":
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(
                caption,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=s,
                max_sequence_length=max_sequence_length,
            )
            _, c, h, w = noisy.shape
            packed = pipe._pack_latents(noisy, s, c, h, w)
            img_ids = pipe._prepare_latent_image_ids(s, h // 2, w // 2, self.device, dtype)
            inputs = dict(
                hidden_states=packed.to(dtype),
                timestep=torch.full((s,), t, device=self.device, dtype=dtype),
                encoder_hidden_states=prompt_embeds.to(dtype),
                pooled_projections=pooled.to(dtype),
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )
            if self.transformer.config.guidance_embeds:
                inputs["guidance"] = torch.full((s,), guidance, device=self.device, dtype=torch.float32)
            return inputs
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=caption,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=s,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return dict(
            hidden_states=noisy.to(dtype),
            timestep=torch.full((s,), t * 1000.0, device=self.device, dtype=dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
        )
