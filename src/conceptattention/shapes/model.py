"""The shapes model: a small diffusers ``FluxTransformer2DModel`` plus a word-level text encoder.

Images are pixels in [-1, 1], packed into p x p patches (p = 8: 8 x 8 = 64 tokens of 192 values; the
shipped model, re-patched by :meth:`ShapesModel.repatch`, has p = 4: 256 tokens of 48 values) that
play the role of Flux's packed latents; generation is rectified flow as in Flux (``x_t = t * noise + (1 - t) * x_0``, velocity ``noise - x_0``).

The transformer's output is either that velocity (``prediction="velocity"``, as in Flux) or the clean
image ``x_0`` itself (``prediction="sample"``), turned into a velocity by :meth:`ShapesModel.velocity`.
With 8 x 8 patches a token carries 192 pixel values, as many as the model is wide; predicting the noise
part of a velocity through that bottleneck leaves ragged, blocky outlines, while a clean image lies on
a far smaller set and passes through it (Li & He 2025, "Back to Basics: Let Denoising Generative Models
Denoise"). The ConceptAttention code path does not depend on the choice: it reads the attention inside.

The text encoder maps each word of a fixed vocabulary to a learned vector, adds a learned position
(and, with ``text_neighbours``, learned maps of the words just before and after it,
:meth:`ShapesModel.mix_text_neighbours`) and runs ``text_layers`` small transformer layers (two by
default; none in a model whose mixing was dropped, :meth:`ShapesModel.drop_text_mixing`); its outputs are the prompt tokens (``joint_attention_dim``)
and their mean over real words is the pooled vector. There is no start token, so a word encoded
alone sits at position 0 and its first output is its concept embedding, as with T5 in the paper.
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
    "<pad>", "a", "an", "and", "on", "in", "the", "with",
    "circle", "square", "triangle",
    "red", "green", "blue", "yellow",
    "gray", "grass", "sky", "background",
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
            named = ", ".join(short(w, 30) for w in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ConceptAttentionError(
                f"the shapes model does not know {named}; its vocabulary is: {' '.join(VOCAB[1:])}"
            )
        if len(words) > max_tokens:
            raise ConceptAttentionError(f"{short(text)} has {len(words)} words; the shapes model reads at most {max_tokens}")
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
    #: What the transformer outputs (one of :data:`PREDICTIONS`); weights saved before it existed: velocity.
    prediction: str = "velocity"
    #: RoPE position of a token = its (row, column) on the token grid times this. A model re-patched from
    #: p to p' patches (:meth:`ShapesModel.repatch`) multiplies it by p'/p, so positions keep their unit.
    rope_scale: float = 1.0
    #: Prompt tokens' RoPE position ids are (word index, 0, 0), on the id axis image tokens leave at 0, so
    #: attention between prompt words sees their relative order (False: zeros, as Flux's pipelines pass).
    #: Concept tokens stay at position 0 either way, as in the paper.
    text_positions: bool = False
    #: Each prompt token also adds learned linear maps of the word embeddings just before and just after it
    #: (padding neither gives nor takes), so "circle" in "a red circle" carries its colour and "red" its shape. A
    #: word encoded alone has no neighbours and is encoded as without them (:meth:`ShapesModel.mix_text_neighbours`).
    text_neighbours: bool = False
    #: With ``text_neighbours``, whether a prompt token also adds the map of the word *after* it. False keeps
    #: only the word before: "circle" in "a red circle" still carries its colour but "red" no longer carries its
    #: shape, so an image token that needs its shape must read the shape word (:meth:`ShapesModel.drop_next_word`).
    text_next_word: bool = True

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


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per position axis (unused, row, column) for a head width, in Flux's proportions
    (128 -> 16, 56, 56; 32 -> 4, 14, 14)."""
    if head_dim < 8 or head_dim % 4:
        raise ConceptAttentionError(f"the attention head width must be a multiple of 4 and at least 8, not {head_dim}")
    side = 2 * round(7 * head_dim / 32)
    return head_dim - 2 * side, side, side


def architecture(patch: int | None = None, layers: int | None = None, single_layers: int | None = None,
                 heads: int | None = None, head_dim: int | None = None, text_layers: int | None = None) -> ShapesConfig:
    """A :class:`ShapesConfig` with some architecture fields changed (None keeps the default)."""
    base = ShapesConfig()
    if patch is not None and (patch < 1 or IMAGE % patch):
        raise ConceptAttentionError(f"the patch size must divide {IMAGE}, not {patch}")
    head_dim = base.attention_head_dim if head_dim is None else head_dim
    return ShapesConfig(
        patch=base.patch if patch is None else patch,
        num_layers=base.num_layers if layers is None else layers,
        num_single_layers=base.num_single_layers if single_layers is None else single_layers,
        num_attention_heads=base.num_attention_heads if heads is None else heads,
        attention_head_dim=head_dim,
        axes_dims_rope=rope_axes(head_dim),
        text_layers=base.text_layers if text_layers is None else text_layers,
    )


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
                config.text_dim, config.text_heads, dim_feedforward=2 * config.text_dim,
                dropout=0.0, batch_first=True, norm_first=True,
            )
            self.layers = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.text_dim)
        self.before = self.after = None
        if config.text_neighbours:
            self.add_neighbours()

    def add_neighbours(self) -> None:
        """Create the maps of the previous and (``text_next_word``) the next word (zero: the encoder starts as it
        was)."""
        d = self.config.text_dim
        device = self.embed.weight.device
        self.before = nn.Linear(d, d, bias=False, device=device)
        nn.init.zeros_(self.before.weight)
        self.after = None
        if self.config.text_next_word:
            self.after = nn.Linear(d, d, bias=False, device=device)
            nn.init.zeros_(self.after.weight)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.embed(ids)
        real = (ids != 0).unsqueeze(-1).to(words.dtype)
        x = words + self.position[: ids.shape[1]]
        if self.before is not None:  # padding neither lends to its neighbours nor borrows from them
            words = words * real
            beside = self.before(nn.functional.pad(words[:, :-1], (0, 0, 1, 0)))
            if self.after is not None:
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


def text_ids(length: int, device: torch.device | str = "cpu", ordered: bool = False) -> torch.Tensor:
    """Flux position ids of ``length`` prompt tokens, ``[length, 3]``: zeros, or with ``ordered`` the word
    index on the first axis (see :attr:`ShapesConfig.text_positions`)."""
    ids = torch.zeros(length, 3, device=device)
    if ordered:
        ids[:, 0] = torch.arange(length, device=device)
    return ids


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
                raise ConceptAttentionError(f"concept {word!r} is not one word; the shapes model's concepts are single words")
        tokens, _ = self.encode_text(list(words))
        return tokens[:, 0]

    def transformer_inputs(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor) -> dict:
        """Keyword arguments of one transformer call (for hooks such as ConceptAttention)."""
        device = x_t.device
        return dict(
            hidden_states=x_t,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t,
            img_ids=image_ids(self.grid, device, self.config.rope_scale),
            txt_ids=text_ids(tokens.shape[1], device, self.config.text_positions),
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

    def predict_as(self, prediction: str) -> None:
        """Reinterpret the output as ``prediction`` (to fine-tune a model into the other parametrisation): the
        output projection starts at zero, so the new head begins from a neutral guess, not from nonsense."""
        if check_prediction(prediction) == self.config.prediction:
            return
        self._reconfigure(prediction=prediction)
        with torch.no_grad():
            self.transformer.proj_out.weight.zero_()
            self.transformer.proj_out.bias.zero_()

    def repatch(self, patch: int) -> None:
        """Change the patch size to ``patch`` (which must divide the current one), keeping what was learnt.

        Every block and the text encoder are kept. The new patch embedding reads a small patch as if it were
        tiled over the old, large one (the old embedding's weights summed over the tiles), so on an image that
        is flat within each old patch every new token starts equal to its old token; the new output head
        predicts each small patch as the mean of the old head's tiles; and RoPE positions keep their unit
        (``rope_scale``), so the children of an old token sit around its position. The model starts close to
        the old one at four times the tokens (for 8 -> 4) and fine-tuning then learns the finer detail."""
        from diffusers import FluxTransformer2DModel

        old = self.config.patch
        if patch < 1 or old % patch:
            raise ConceptAttentionError(f"a model with {old}x{old} patches can be re-patched to a size that divides "
                                        f"{old}, not {patch}")
        if patch == old:
            return
        k, n = old // patch, patch
        config = self._changed_config(patch=patch, rope_scale=self.config.rope_scale * patch / old)
        inner = self.transformer.x_embedder.out_features
        param = next(self.transformer.parameters())
        new = FluxTransformer2DModel(**config.transformer_kwargs()).to(param.device)
        if param.dtype != torch.float32:
            new = new.to(dtype=param.dtype)
        kept = {name: value for name, value in self.transformer.state_dict().items()
                if not name.startswith(("x_embedder.", "proj_out."))}
        missing, unexpected = new.load_state_dict(kept, strict=False)
        assert not unexpected and sorted(missing) == sorted(
            ["x_embedder.weight", "x_embedder.bias", "proj_out.weight", "proj_out.bias"]), (missing, unexpected)
        with torch.no_grad():  # token layout: channel, row in patch, column in patch (see pack)
            w_in = self.transformer.x_embedder.weight.view(inner, 3, k, n, k, n)
            new.x_embedder.weight.copy_(w_in.sum(dim=(2, 4)).reshape(inner, 3 * n * n))
            new.x_embedder.bias.copy_(self.transformer.x_embedder.bias)
            w_out = self.transformer.proj_out.weight.view(3, k, n, k, n, inner)
            new.proj_out.weight.copy_(w_out.mean(dim=(1, 3)).reshape(3 * n * n, inner))
            b_out = self.transformer.proj_out.bias.view(3, k, n, k, n)
            new.proj_out.bias.copy_(b_out.mean(dim=(1, 3)).reshape(3 * n * n))
        new.train(self.transformer.training)
        self.transformer = new
        self.config = self.text_encoder.config = config

    def drop_text_mixing(self) -> None:
        """Remove the text encoder's transformer layers (``text_layers`` becomes 0), keeping its word and
        position embeddings and final norm: each prompt token is then its own word plus its position, so a
        concept encoded alone differs from the same word inside a caption only by its position. Fine-tuning
        then teaches the transformer to do the mixing it needs itself. A model without mixing is left as it is."""
        if self.config.text_layers == 0:
            return
        self.text_encoder.layers = nn.Identity()
        self._reconfigure(text_layers=0)

    def order_text_positions(self) -> None:
        """From now on give prompt tokens RoPE positions in word order (``text_positions``), so that binding
        a word to its neighbour ("red" to the "circle" after it) is a relative position for the transformer's
        text-to-text attention instead of something learnt from absolute position embeddings. No weight
        changes; fine-tuning adapts the model to the new inputs."""
        self._reconfigure(text_positions=True)

    def mix_text_neighbours(self) -> None:
        """From now on let each prompt token add maps of its neighbouring words (``text_neighbours``), so that
        binding a colour to its shape is something a token carries, not a relation the transformer must find
        from word positions. The maps start at zero, so the model is unchanged until fine-tuning moves them;
        concepts encoded alone never see them. A model that has them is left as it is."""
        if self.config.text_neighbours:
            return
        self.text_encoder.add_neighbours()
        self._reconfigure(text_neighbours=True)

    def drop_next_word(self) -> None:
        """Keep only the map of the word *before* each prompt token (``text_next_word`` becomes False; neighbour
        maps are added first if the model has none). The binding then lives in the shape word, which carries its
        colour, and no longer in the colour word: an image token, which sees its own colour early, must read its
        shape word to learn its shape, a read ConceptAttention's shape maps could match (in the README's drop-next-word
        try it lifted the DAAM-style shape pick, not ConceptAttention's). The map of the previous word is kept as
        trained; the model changes until fine-tuning adapts it. A model without the map of the next word is left
        as it is."""
        self.mix_text_neighbours()
        if not self.config.text_next_word:
            return
        self.text_encoder.after = None
        self._reconfigure(text_next_word=False)

    def _changed_config(self, **changes) -> ShapesConfig:
        return ShapesConfig(**{**asdict(self.config), **changes})

    def _reconfigure(self, **changes) -> None:
        """Replace the config (shared by the model and its text encoder) by one with ``changes``."""
        self.config = self.text_encoder.config = self._changed_config(**changes)

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
    def load(cls, directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "ShapesModel":
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, config_file = directory / "model.safetensors", directory / "config.json"
        if not weights.is_file() or not config_file.is_file():
            raise ConceptAttentionError(
                f"no shapes model in {directory} (expected model.safetensors and config.json); "
                "train one with `conceptattention train-shapes --out DIR`"
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
