"""Model surgery: the changes that turn one trained shapes model into the starting point of the next stage.

Each function changes a :class:`~conceptattention.shapes.model.ShapesModel` in place and replaces its config
(shared by the model and its text encoder) by one that says what was changed, so the model saves and loads
as what it now is. Fine-tuning then adapts the model to the change.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from conceptattention.errors import ConceptAttentionError
from conceptattention.shapes.model import ShapesConfig, ShapesModel, check_prediction


def changed_config(model: ShapesModel, **changes) -> ShapesConfig:
    """``model``'s config with ``changes``."""
    return ShapesConfig(**{**asdict(model.config), **changes})


def reconfigure(model: ShapesModel, **changes) -> None:
    """Give ``model`` and its text encoder the config with ``changes``."""
    model.config = model.text_encoder.config = changed_config(model, **changes)


def predict_as(model: ShapesModel, prediction: str) -> None:
    """Reinterpret the transformer's output as ``prediction`` ("velocity" or "sample"): the output projection
    starts at zero, so the new head begins from a neutral guess. A model that predicts it already is left
    as it is."""
    if check_prediction(prediction) == model.config.prediction:
        return
    reconfigure(model, prediction=prediction)
    with torch.no_grad():
        model.transformer.proj_out.weight.zero_()
        model.transformer.proj_out.bias.zero_()


def repatch(model: ShapesModel, patch: int) -> None:
    """Change the patch size to ``patch`` (which must divide the current one), keeping every block and the
    text encoder.

    The new patch embedding reads a small patch as if it were tiled over the old, large one (the old
    embedding's weights summed over the tiles), so on an image that is flat within each old patch every new
    token starts equal to its old token; the new output head predicts each small patch as the mean of the
    old head's tiles; and RoPE positions keep their unit (``rope_scale`` times new/old), so the children of
    an old token sit around its position."""
    from diffusers import FluxTransformer2DModel

    old = model.config.patch
    if patch < 1 or old % patch:
        raise ConceptAttentionError(
            f"a model with {old}x{old} patches can be re-patched to a size that divides {old}, not {patch}"
        )
    if patch == old:
        return
    k, n = old // patch, patch
    config = changed_config(model, patch=patch, rope_scale=model.config.rope_scale * patch / old)
    inner = model.transformer.x_embedder.out_features
    param = next(model.transformer.parameters())
    new = FluxTransformer2DModel(**config.transformer_kwargs()).to(param.device, param.dtype)
    kept = {
        name: value
        for name, value in model.transformer.state_dict().items()
        if not name.startswith(("x_embedder.", "proj_out."))
    }
    missing, unexpected = new.load_state_dict(kept, strict=False)
    assert not unexpected and sorted(missing) == sorted(
        ["x_embedder.weight", "x_embedder.bias", "proj_out.weight", "proj_out.bias"]
    ), (missing, unexpected)
    with torch.no_grad():  # token layout: channel, row in patch, column in patch (see shapes.model.pack)
        w_in = model.transformer.x_embedder.weight.view(inner, 3, k, n, k, n)
        new.x_embedder.weight.copy_(w_in.sum(dim=(2, 4)).reshape(inner, 3 * n * n))
        new.x_embedder.bias.copy_(model.transformer.x_embedder.bias)
        w_out = model.transformer.proj_out.weight.view(3, k, n, k, n, inner)
        new.proj_out.weight.copy_(w_out.mean(dim=(1, 3)).reshape(3 * n * n, inner))
        b_out = model.transformer.proj_out.bias.view(3, k, n, k, n)
        new.proj_out.bias.copy_(b_out.mean(dim=(1, 3)).reshape(3 * n * n))
    new.train(model.transformer.training)
    model.transformer = new
    model.config = model.text_encoder.config = config


def drop_text_mixing(model: ShapesModel) -> None:
    """Remove the text encoder's transformer layers (``text_layers`` becomes 0), keeping its word and position
    embeddings and its final norm: each prompt token is then its own word plus its position, normalised. A
    model without mixing layers is left as it is."""
    if model.config.text_layers == 0:
        return
    model.text_encoder.layers = nn.Identity()
    reconfigure(model, text_layers=0)


def mix_text_neighbours(model: ShapesModel) -> None:
    """Let each prompt token add learned linear maps of the words just before and after it
    (``text_neighbours``). The maps start at zero, so the model's outputs are unchanged until they are
    trained; a concept encoded alone has no neighbours and never sees them. A model that has them is left as
    it is."""
    if model.config.text_neighbours:
        return
    reconfigure(model, text_neighbours=True)
    model.text_encoder.add_neighbours()
