"""Generate and encode with the built-in shapes model, with ConceptAttention maps."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..core import ConceptAttention, default_layers
from ..errors import ConceptAttentionError
from ..shapes.model import IMAGE, ShapesModel, pack, sampling_times, unpack
from .base import MapsPipeline
from .images import batch_seeds, fit_square, noise_samples, sum_word_tokens
from .options import check_seed, distinct_concepts
from .result import ConceptResult, result_from_maps, result_from_session, with_raw
from .result import upsample as _upsample

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "shapes" / "weights"


def upsample(token_maps: torch.Tensor, size: int = IMAGE) -> torch.Tensor:
    """``[K, h, w]`` -> ``[K, size, size]``, bilinear (keeps per-pixel sums over concepts)."""
    return _upsample(token_maps, (size, size))


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> PIL RGB."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


class ShapesPipeline(MapsPipeline):
    """The shapes model behind the common ``generate`` / ``encode`` interface (64x64 images)."""

    options = frozenset({"shift"})

    def __init__(self, model: ShapesModel, name: str = "shapes", weights_version: str | None = None) -> None:
        self.model = model.eval()
        self.name = name
        #: The release of the weights (``weights_version`` in their config.json), recorded in every result.
        self.weights_version = weights_version

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu") -> ShapesPipeline:
        """Load the shipped weights (default) or a directory written by ``train-shapes``."""
        directory = Path(path) if path is not None else WEIGHTS_DIR
        model = ShapesModel.load(directory, device=device)
        version = json.loads((directory / "config.json").read_text()).get("weights_version")
        return cls(model, name="shapes" if path is None else str(path), weights_version=version)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _concepts(self, concepts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        words = distinct_concepts(concepts)
        return words, self.model.encode_concepts(words)

    def sampler_settings(self, guidance: float | None, shift: float | None) -> tuple[float, float]:
        """(guidance, shift) with None replaced by the model's defaults."""
        config = self.model.config
        return (
            config.default_guidance if guidance is None else guidance,
            config.default_shift if shift is None else shift,
        )

    #: Noise level of a real-image pass, and noise draws averaged, unless told otherwise.
    default_t: float = 0.5
    default_samples: int = 4

    @property
    def default_layers(self) -> tuple[int, ...]:
        """Blocks read unless told otherwise: the model card's choice, else the core default."""
        configured = self.model.config.map_layers
        return tuple(configured) if configured else default_layers(self.model.config.num_layers)

    def _session(self, embeds: torch.Tensor, layers, readouts, calls=None) -> ConceptAttention:
        chosen = list(layers) if layers else list(self.default_layers)
        transformer: Any = self.model.transformer  # mypy reads diffusers' lazy export as its dummy class
        return ConceptAttention(transformer, embeds, layers=chosen, readouts=readouts, calls=calls)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        concepts: Sequence[str],
        *,
        steps: int = 20,
        guidance: float | None = None,
        shift: float | None = None,
        seed: int = 0,
        layers: Sequence[int] | None = None,
        map_steps: Sequence[int] | None = None,
        readouts: Sequence[str] = ("concept_attention",),
    ) -> ConceptResult:
        """Text -> image by rectified-flow Euler sampling with classifier-free guidance, plus maps.

        Maps average the chosen ``layers`` over the denoising steps in ``map_steps`` (default: all).
        """
        if steps < 1:
            raise ConceptAttentionError("steps must be at least 1")
        words, embeds = self._concepts(concepts)
        check_seed(seed)
        guidance, shift = self.sampler_settings(guidance, shift)
        began = time.perf_counter()
        session = self._session(embeds, layers, with_raw(readouts), calls=map_steps)
        with session:
            images = self.sample([prompt], [seed], steps=steps, guidance=guidance, shift=shift)
        image = to_pil(images[0])
        settings = {
            "model": self.name,
            "weights_version": self.weights_version,
            "mode": "generate",
            "prompt": prompt,
            "steps": steps,
            "guidance": guidance,
            "shift": shift,
            "seed": seed,
            "layers": list(session.layers),
            "map_steps": map_steps,
            "readout": readouts[0],
            "seconds": round(time.perf_counter() - began, 3),
        }
        return result_from_session(image, session, words, settings, batch_index=-1)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = 20,
        guidance: float | None = None,
        shift: float | None = None,
    ) -> torch.Tensor:
        """Images ``[N, 3, 64, 64]`` in [0, 1] for prompts, seed i's noise for prompt i (one batched run).

        One transformer call per step on the batch ``[unconditional x N, conditional x N]``, at the noise
        levels of :func:`~conceptattention.shapes.model.sampling_times` (``shift`` None: the model's default).
        """
        guidance, shift = self.sampler_settings(guidance, shift)
        times = sampling_times(steps, shift)
        n, tokens_per_image = len(prompts), self.model.grid**2
        channels = 3 * self.model.config.patch**2
        tokens, pooled = self.model.encode_text([""] * n + list(prompts))
        x = torch.cat(
            [torch.randn(1, tokens_per_image, channels, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(self.device)
        for i in range(steps):
            t = torch.full((2 * n,), float(times[i]), device=self.device)
            v_uncond, v_cond = self.model.velocity(torch.cat([x, x]), t, tokens, pooled).chunk(2)
            x = x + (times[i + 1] - times[i]) * (v_uncond + guidance * (v_cond - v_uncond))
        return (unpack(x, self.model.config.patch) * 0.5 + 0.5).clamp(0, 1)

    def _fit(self, image: Any) -> tuple[torch.Tensor, str]:
        """``[3, 64, 64]`` in [0, 1], and what was done to fit the image to the model's fixed square size: a float
        tensor of that shape is used as is (no 8-bit rounding); any other image is center-cropped to a square
        and resized (:func:`~conceptattention.pipelines.images.fit_square`), never squashed."""
        if isinstance(image, torch.Tensor) and image.shape == (3, IMAGE, IMAGE) and image.is_floating_point():
            return image.float().clamp(0, 1), f"unchanged ({IMAGE}x{IMAGE})"
        return fit_square(image, IMAGE)

    def _pixels(self, image: Any) -> torch.Tensor:
        return self._fit(image)[0]

    @torch.no_grad()
    def token_maps(
        self,
        images: Sequence[Any],
        concepts: Sequence[str],
        captions: Sequence[str],
        *,
        readouts: Sequence[str] = ("concept_attention",),
        t: float = 0.5,
        samples: int = 4,
        seeds: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Maps of B real images in one early-stopped pass: ``{readout: [B, K, h, w]}`` (float32, CPU).

        Image b gets ``samples`` noise draws from seeds ``seeds[b] .. seeds[b] + samples - 1`` at ``t``,
        and its own caption; maps are averaged over its draws. The same image, caption and seed give the
        same maps whatever else is in the batch (up to float rounding of batched kernels).
        """
        _, embeds = self._concepts(concepts)
        inputs, b = self._noisy_inputs(images, captions, t, samples, seeds)
        with self._session(embeds, layers, list(readouts)) as session:
            session.forward_until_last_layer(**inputs)
        return {name: m.unflatten(0, (b, samples)).mean(1).float().cpu() for name, m in session.all_maps().items()}

    def _noisy_inputs(
        self, images: Sequence[Any], captions: Sequence[str], t: float, samples: int, seeds: Sequence[int] | None
    ) -> tuple[dict, int]:
        """Transformer inputs of B images x S noise draws at ``t`` (draws of image b from seeds[b] + s)."""
        if not 0.0 <= t <= 1.0:
            raise ConceptAttentionError(f"t must be in [0, 1], not {t}")
        if samples < 1:
            raise ConceptAttentionError("samples must be at least 1")
        seeds = batch_seeds(images, captions, seeds)
        b, patch = len(images), self.model.config.patch
        pixels = torch.stack([self._pixels(im) for im in images]).to(self.device)
        x0 = pack(pixels * 2 - 1, patch)  # [B, N, C]
        noise = torch.stack([noise_samples(x0.shape[1:], samples, int(s)) for s in seeds]).to(self.device)
        x_t = (t * noise + (1 - t) * x0[:, None]).flatten(0, 1)  # [B*S, N, C]
        tokens, pooled = self.model.encode_text([c for c in captions for _ in range(samples)])
        timesteps = torch.full((b * samples,), t, device=self.device)
        return self.model.transformer_inputs(x_t, timesteps, tokens, pooled), b

    @torch.no_grad()
    def prompt_maps(
        self,
        images: Sequence[Any],
        concepts: Sequence[str],
        captions: Sequence[str],
        *,
        t: float = 0.5,
        samples: int = 4,
        seeds: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """DAAM-style maps ``[B, K, h, w]``: image-to-caption attention summed over each concept's
        occurrences in the caption (all zero for a concept the caption does not contain)."""
        from ..prompt_attention import PromptAttention

        words, _ = self._concepts(concepts)
        inputs, b = self._noisy_inputs(images, captions, t, samples, seeds)
        chosen = list(layers) if layers else list(self.default_layers)
        transformer: Any = self.model.transformer  # mypy reads diffusers' lazy export as its dummy class
        with PromptAttention(transformer, layers=chosen) as session:
            session.forward_until_last_layer(**inputs)
        per_token = session.maps().unflatten(0, (b, samples)).mean(1).float().cpu()  # [B, S_text, h, w]
        maps = []
        for i, caption in enumerate(captions):
            tokens = caption.lower().replace(",", " ").split()  # the shapes tokenizer: one token per word
            positions = [[p for p, tok in enumerate(tokens) if tok == word.lower()] for word in words]
            maps.append(sum_word_tokens(per_token[i], positions))
        return torch.stack(maps)

    @torch.no_grad()
    def encode(
        self,
        image: Any,
        concepts: Sequence[str],
        *,
        caption: str = "",
        t: float = 0.5,
        samples: int = 4,
        seed: int = 0,
        layers: Sequence[int] | None = None,
        readouts: Sequence[str] = ("concept_attention",),
    ) -> ConceptResult:
        """A real image -> maps: noise at ``t`` for ``samples`` seeds batched in one early-stopped pass.

        The model is fixed at 64x64: another image is center-cropped to a square, then resized; the result's
        image is what the model saw and ``settings["input_fit"]`` says what was done."""
        began = time.perf_counter()
        words = distinct_concepts(concepts)
        check_seed(seed)
        pixels, fit = self._fit(image)
        maps = self.token_maps(
            [pixels], words, [caption], readouts=with_raw(readouts), t=t, samples=samples, seeds=[seed], layers=layers
        )
        chosen = list(layers) if layers else list(self.default_layers)
        settings = {
            "model": self.name,
            "weights_version": self.weights_version,
            "mode": "encode",
            "caption": caption,
            "t": t,
            "samples": samples,
            "seed": seed,
            "layers": chosen,
            "readout": readouts[0],
            "input_fit": fit,
            "seconds": round(time.perf_counter() - began, 3),
        }
        return result_from_maps(to_pil(pixels), {k: v[0] for k, v in maps.items()}, words, settings)
