"""ConceptAttention on a small random-weight Flux transformer, fully offline.

Shows the whole core API: attach to a stock diffusers transformer, run it, read the maps, and check
that the model's output did not change. With real weights, pass the pipeline's ``.transformer`` and
concept embeddings from the model's own text encoder instead of random ones.

    python examples/quickstart.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

from conceptattention import ConceptAttention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where maps.npy and result.json go")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        num_layers=4,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        in_channels=16,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    h, w, text_tokens = 12, 20, 16  # a non-square 12 x 20 token grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 16),
        encoder_hidden_states=torch.randn(1, text_tokens, 64),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )
    concept_names = ["dog", "tree", "sky", "background"]
    concept_embeds = torch.randn(len(concept_names), 64)  # stand-ins for T5 embeddings of each word

    with torch.inference_mode():
        plain = model(**inputs)[0]
        with ConceptAttention(
            model, concept_embeds, layers=[1, 2, 3], readouts=["concept_attention", "cross_attention"]
        ) as ca:
            hooked = model(**inputs)[0]
        maps = ca.maps()  # [B, K, h, w]: softmax over concepts, mean over layers
        cross = ca.maps("cross_attention")

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "maps.npy", maps[0].numpy().astype(np.float32))
    result = {
        "concepts": concept_names,
        "layers": list(ca.layers),
        "maps_shape": list(maps.shape[1:]),
        "output_unchanged": bool(torch.equal(plain, hooked)),
        "winning_concept_share": {
            name: float((maps[0].argmax(0) == i).float().mean()) for i, name in enumerate(concept_names)
        },
        "cross_attention_sums_to_one_over_image": bool(
            torch.allclose(cross.sum(dim=(-2, -1)), torch.ones(1, len(concept_names)), atol=1e-4)
        ),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'maps.npy'} and {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
