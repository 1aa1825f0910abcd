"""The shapes model: a small diffusers ``FluxTransformer2DModel`` plus a word-level text encoder.

Images are pixels in [-1, 1], packed into p x p patches (p = 8: 8 x 8 = 64 tokens of 192 values; the
shipped model has p = 4: 256 tokens of 48 values) that play the role of Flux's packed latents;
generation is rectified flow as in Flux (``x_t = t * noise + (1 - t) * x_0``, velocity ``noise - x_0``).

The transformer's output is either that velocity (``prediction="velocity"``, as in Flux) or the clean
image ``x_0`` itself (``prediction="sample"``, as in Li & He 2025, "Back to Basics: Let Denoising
Generative Models Denoise"), turned into a velocity by :meth:`ShapesModel.velocity`. The ConceptAttention
code path does not depend on the choice: it reads the attention inside.

The text encoder maps each word of a fixed vocabulary to a learned vector, adds a learned position
(and, with ``text_neighbours``, learned maps of the words just before and after it) and runs
``text_layers`` small transformer layers (none in the shipped model); its outputs are the prompt tokens
(``joint_attention_dim``) and their mean over real words is the pooled vector. There is no start token,
so a word encoded alone sits at position 0 and its first output is its concept embedding, as with T5 in
the paper. The changes that turn one trained model into the next (re-patching, dropping the word mixing,
adding the neighbour maps, switching the prediction) are training tools and live in the lab
(``conceptattention_lab.surgery``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConceptAttentionError, short

IMAGE = 64

#: Every word the text encoder knows. Index 0 is padding.
VOCAB: tuple[str, ...] = (
    "<pad>",
    "a",
    "an",
    "and",
    "on",
    "in",
    "the",
    "with",
    "circle",
    "square",
    "triangle",
    "red",
    "green",
    "blue",
    "yellow",
    "gray",
    "grass",
    "sky",
    "background",
)
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}

#: What the transformer's output means: the flow's velocity (as in Flux) or the clean image.
PREDICTIONS = ("velocity", "sample")
#: A sample-predicting model's velocity divides by t; below this t it divides by this instead.
SAMPLE_T_MIN = 0.05


def check_prediction(prediction: str) -> str:
    """``prediction`` if it is one of :data:`PREDICTIONS`, else one clear error."""
    if prediction not in PREDICTIONS:
        raise ConceptAttentionError(f"prediction must be one of {', '.join(PREDICTIONS)}, not {prediction!r}")
    return prediction


def tokenize(texts: list[str], max_tokens: int) -> torch.Tensor:
    """Words -> ids ``[B, max_tokens]`` (padded with 0). Unknown words raise, listing the vocabulary."""
    rows = []
    for text in texts:
        words = text.lower().replace(",", " ").split()
        unknown = list(dict.fromkeys(w for w in words if w not in WORD_TO_ID or w == "<pad>"))
        if unknown:
            named = ", ".join(short(w, 30) for w in unknown[:5]) + (
                f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            raise ConceptAttentionError(
                f"the shapes model does not know {named}; its vocabulary is: {' '.join(VOCAB[1:])}"
            )
        if len(words) > max_tokens:
            raise ConceptAttentionError(
                f"{short(text)} has {len(words)} words; the shapes model reads at most {max_tokens}"
            )
        rows.append([WORD_TO_ID[w] for w in words] + [0] * (max_tokens - len(words)))
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class ShapesConfig:
    """Architecture of the shapes model (stored next to the weights)."""

    patch: int = 8
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16
    num_layers: int = 6
    num_single_layers: int = 2
    attention_head_dim: int = 32
    num_attention_heads: int = 6
    axes_dims_rope: tuple[int, int, int] = (4, 14, 14)
    vocab: tuple[str, ...] = field(default_factory=lambda: VOCAB)
    #: Double-stream blocks read for maps by default (None: the core's depth-scaled default).
    map_layers: tuple[int, ...] | None = None
    #: Classifier-free guidance scale used by default when sampling.
    default_guidance: float = 4.0
    #: Timestep shift of the sampler by default (:func:`sampling_times`; 1: evenly spaced steps).
    default_shift: float = 1.0
    #: What the transformer outputs (one of :data:`PREDICTIONS`).
    prediction: str = "velocity"
    #: RoPE position of a token = its (row, column) on the token grid times this (a model re-patched from
    #: p to p' patches has p'/p, so positions keep the unit of the original patches).
    rope_scale: float = 1.0
    #: Each prompt token also adds learned linear maps of the word embeddings just before and just after it
    #: (padding neither gives nor takes), so "circle" in "a red circle" carries its colour and "red" its shape. A
    #: word encoded alone has no neighbours and is encoded as without them.
    text_neighbours: bool = False

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        if self.text_layers < 0:
            raise ConceptAttentionError(f"the text encoder's layer count cannot be negative, not {self.text_layers}")

    def transformer_kwargs(self) -> dict:
        return dict(
            patch_size=1,
            in_channels=3 * self.patch * self.patch,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.text_dim,
            pooled_projection_dim=self.text_dim,
            guidance_embeds=False,
            axes_dims_rope=tuple(self.axes_dims_rope),
        )


def sampling_times(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Noise levels ``[steps + 1]`` from 1 down to 0 for an Euler sampler: evenly spaced ``u`` mapped to
    ``shift * u / (1 + (shift - 1) * u)``, the timestep shift of Flux's and SD3's schedulers. A shift
    above 1 spends more of the steps at high noise, where the layout is decided."""
    if steps < 1:
        raise ConceptAttentionError("steps must be at least 1")
    if not shift > 0:
        raise ConceptAttentionError(f"the timestep shift must be positive, not {shift}")
    if shift == 1.0:
        return torch.linspace(1.0, 0.0, steps + 1)
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()


class ShapesTextEncoder(nn.Module):
    """Word-level text encoder: ids ``[B, L]`` -> (tokens ``[B, L, D]``, pooled ``[B, D]``)."""

    def __init__(self, config: ShapesConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(len(config.vocab), config.text_dim)
        self.position = nn.Parameter(torch.zeros(config.max_tokens, config.text_dim))
        nn.init.normal_(self.position, std=0.02)
        if config.text_layers == 0:  # no word mixing: a prompt token is its word's embedding plus its position
            self.layers: nn.Module = nn.Identity()
        else:
            layer = nn.TransformerEncoderLayer(
                config.text_dim,
                config.text_heads,
                dim_feedforward=2 * config.text_dim,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            self.layers = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.text_dim)
        self.before = self.after = None
        if config.text_neighbours:
            self.add_neighbours()

    def add_neighbours(self) -> None:
        """Create the maps of the previous and the next word, at zero (the encoder's outputs are unchanged
        until they are trained)."""
        d = self.config.text_dim
        device = self.embed.weight.device
        self.before = nn.Linear(d, d, bias=False, device=device)
        self.after = nn.Linear(d, d, bias=False, device=device)
        nn.init.zeros_(self.before.weight)
        nn.init.zeros_(self.after.weight)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.embed(ids)
        real = (ids != 0).unsqueeze(-1).to(words.dtype)
        x = words + self.position[: ids.shape[1]]
        if self.before is not None:  # padding neither lends to its neighbours nor borrows from them
            words = words * real
            beside = self.before(nn.functional.pad(words[:, :-1], (0, 0, 1, 0)))
            beside = beside + self.after(nn.functional.pad(words[:, 1:], (0, 0, 0, 1)))
            x = x + beside * real
        tokens = self.norm(self.layers(x))
        real = real.to(tokens.dtype)
        pooled = (tokens * real).sum(1) / real.sum(1).clamp(min=1.0)
        return tokens, pooled


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, 3, 64, 64]`` -> tokens ``[B, (64/p)^2, 3 p^2]`` (row-major p x p patches)."""
    b, g = images.shape[0], IMAGE // patch
    x = images.view(b, 3, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, g * g, 3 * patch * patch)


def unpack(tokens: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b, g = tokens.shape[0], IMAGE // patch
    x = tokens.view(b, g, g, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, 3, IMAGE, IMAGE)


def image_ids(grid: int, device: torch.device | str = "cpu", scale: float = 1.0) -> torch.Tensor:
    """Flux position ids of a square token grid, ``[grid^2, 3]`` = (0, row * scale, col * scale)."""
    ids = torch.zeros(grid, grid, 3, device=device)
    ids[..., 1] = torch.arange(grid, device=device)[:, None] * scale
    ids[..., 2] = torch.arange(grid, device=device)[None, :] * scale
    return ids.reshape(-1, 3)


def text_ids(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flux position ids of ``length`` prompt tokens, ``[length, 3]``: zeros, as Flux's pipelines pass them."""
    return torch.zeros(length, 3, device=device)


class ShapesModel(nn.Module):
    """Text encoder + Flux transformer of the shapes world."""

    def __init__(self, config: ShapesConfig | None = None) -> None:
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.config = config or ShapesConfig()
        self.text_encoder = ShapesTextEncoder(self.config)
        self.transformer = FluxTransformer2DModel(**self.config.transformer_kwargs())

    @property
    def grid(self) -> int:
        """Tokens per side of the image grid."""
        return IMAGE // self.config.patch

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenize(texts, self.config.max_tokens).to(self.text_encoder.position.device)
        return self.text_encoder(ids)

    def encode_concepts(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded on its own; its first token's output ``[K, text_dim]``."""
        if not words:
            raise ConceptAttentionError("the concept list is empty: give at least one concept word")
        for word in words:
            if len(word.split()) != 1:
                raise ConceptAttentionError(
                    f"concept {word!r} is not one word; the shapes model's concepts are single words"
                )
        tokens, _ = self.encode_text(list(words))
        return tokens[:, 0]

    def transformer_inputs(
        self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor
    ) -> dict:
        """Keyword arguments of one transformer call (for hooks such as ConceptAttention)."""
        device = x_t.device
        return dict(
            hidden_states=x_t,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t,
            img_ids=image_ids(self.grid, device, self.config.rope_scale),
            txt_ids=text_ids(tokens.shape[1], device),
            return_dict=False,
        )

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The flow's velocity at ``(x_t, t)``, whatever the transformer predicts (float32 for a sample model:
        the division by a small t would magnify bf16 rounding)."""
        out = self.transformer(**self.transformer_inputs(x_t, t, tokens, pooled))[0]
        if self.config.prediction == "velocity":
            return out
        scale = t.float().clamp(min=SAMPLE_T_MIN)[:, None, None]
        return ((x_t.float() - out.float()) / scale).to(x_t.dtype)

    # ----- weights -------------------------------------------------------------------------------
    def save(self, directory: Path, dtype: torch.dtype = torch.bfloat16, extra: dict | None = None) -> None:
        """Weights as safetensors (``dtype``) and the config as JSON."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        meta = {"config": asdict(self.config), **(extra or {})}
        (directory / "config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(
        cls, directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> ShapesModel:
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, config_file = directory / "model.safetensors", directory / "config.json"
        if not weights.is_file() or not config_file.is_file():
            raise ConceptAttentionError(
                f"no shapes model in {directory} (expected model.safetensors and config.json); "
                "train one with `conceptattention train-shapes --config STAGE.json --out DIR` (from the lab)"
            )
        try:
            raw = json.loads(config_file.read_text())["config"]
            raw["axes_dims_rope"] = tuple(raw["axes_dims_rope"])
            raw["vocab"] = tuple(raw["vocab"])
            if raw.get("map_layers") is not None:
                raw["map_layers"] = tuple(raw["map_layers"])
            model = cls(ShapesConfig(**raw))
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise ConceptAttentionError(
                f"{config_file} is not a valid shapes-model config ({type(err).__name__}); restore it from where the "
                "model came from, or retrain with `conceptattention train-shapes`"
            ) from None
        try:
            state = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}
            model.load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a corrupt file
            raise ConceptAttentionError(
                f"{weights} cannot be read as this model's weights ({type(err).__name__}); the file is damaged or "
                "belongs to another model: restore it, or retrain with `conceptattention train-shapes`"
            ) from None
        return model.to(device=device, dtype=dtype).eval()
