"""Generate and encode with the built-in shapes model, with ConceptAttention maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..core import ConceptAttention, default_layers
from ..errors import ConceptAttentionError
from ..shapes.model import IMAGE, ShapesModel, pack, unpack
from .images import load_image
from .result import ConceptResult

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "shapes" / "weights"


def upsample(token_maps: torch.Tensor, size: int = IMAGE) -> torch.Tensor:
    """``[K, h, w]`` -> ``[K, size, size]``, bilinear (keeps per-pixel sums over concepts)."""
    return F.interpolate(token_maps[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> PIL RGB."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


class ShapesPipeline:
    """The shapes model behind the common ``generate`` / ``encode`` interface."""

    def __init__(self, model: ShapesModel, name: str = "shapes") -> None:
        self.model = model.eval()
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu") -> "ShapesPipeline":
        """Load the shipped weights (default) or a directory written by ``train-shapes``."""
        directory = Path(path) if path is not None else WEIGHTS_DIR
        return cls(ShapesModel.load(directory, device=device), name="shapes" if path is None else str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _concepts(self, concepts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        words = [c.strip() for c in concepts]
        if not words:
            raise ConceptAttentionError("the concept list is empty: pass at least one concept word")
        return words, self.model.encode_concepts(words)

    @property
    def default_layers(self) -> tuple[int, ...]:
        """Blocks read unless told otherwise: the model card's choice, else the core default."""
        configured = self.model.config.map_layers
        return tuple(configured) if configured else default_layers(self.model.config.num_layers)

    def _session(self, embeds: torch.Tensor, layers, readouts, calls=None) -> ConceptAttention:
        chosen = list(layers) if layers else list(self.default_layers)
        return ConceptAttention(self.model.transformer, embeds, layers=chosen, readouts=readouts, calls=calls)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        concepts: Sequence[str],
        *,
        steps: int = 20,
        guidance: float = 4.0,
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
        tokens, pooled = self.model.encode_text(["", prompt])  # [uncond, cond]
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, self.model.grid ** 2, 3 * self.model.config.patch ** 2, generator=g).to(self.device)
        times = torch.linspace(1.0, 0.0, steps + 1)
        session = self._session(embeds, layers, list(readouts), calls=map_steps)
        with session:
            for i in range(steps):
                t = torch.full((2,), float(times[i]), device=self.device)
                v_uncond, v_cond = self.model.velocity(x.expand(2, -1, -1), t, tokens, pooled).chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
                x = x + (times[i + 1] - times[i]) * v
        image = to_pil(unpack(x, self.model.config.patch)[0] * 0.5 + 0.5)
        settings = {"model": self.name, "mode": "generate", "prompt": prompt, "steps": steps, "guidance": guidance,
                    "seed": seed, "layers": list(session.layers), "map_steps": map_steps,
                    "readout": readouts[0]}
        return self._result(image, session, words, settings, batch_index=1)

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
        """A real image -> maps: noise at ``t`` for ``samples`` seeds batched in one early-stopped pass."""
        if not 0.0 <= t <= 1.0:
            raise ConceptAttentionError(f"t must be in [0, 1], not {t}")
        if samples < 1:
            raise ConceptAttentionError("samples must be at least 1")
        words, embeds = self._concepts(concepts)
        pixels = load_image(image, size=(IMAGE, IMAGE)).to(self.device)  # [3, 64, 64] in [0, 1]
        x0 = pack(pixels[None] * 2 - 1, self.model.config.patch)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((samples, *x0.shape[1:]), generator=g).to(self.device)
        x_t = t * noise + (1 - t) * x0
        tokens, pooled = self.model.encode_text([caption] * samples)
        session = self._session(embeds, layers, list(readouts))
        with session:
            session.forward_until_last_layer(
                **self.model.transformer_inputs(x_t, torch.full((samples,), t, device=self.device), tokens, pooled)
            )
        settings = {"model": self.name, "mode": "encode", "caption": caption, "t": t, "samples": samples,
                    "seed": seed, "layers": list(session.layers), "readout": readouts[0]}
        return self._result(to_pil(pixels), session, words, settings, batch_index=None)

    def _result(self, image, session, words, settings, batch_index) -> ConceptResult:
        def pick(maps: torch.Tensor) -> torch.Tensor:  # [B, K, h, w] -> [K, h, w]
            return maps.mean(0) if batch_index is None else maps[batch_index]

        all_maps = {name: pick(m).float().cpu() for name, m in session.all_maps().items()}
        first = next(iter(all_maps))
        token_maps = all_maps.pop(first)
        return ConceptResult(
            image=image,
            maps=upsample(token_maps),
            token_maps=token_maps,
            concepts=words,
            settings=settings,
            extra_maps={name: upsample(m) for name, m in all_maps.items()},
        )
