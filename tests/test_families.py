"""What every model family must do, checked on each one's tiny random-weight models of the real classes.

Each family contributes ``tests/tiny_family_<name>.py`` (its tiny transformer, call inputs and
pipeline, built offline); the checks here are the same for all. A family's own numbers against an
independent recomputation live in ``tests/test_families_<name>.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import hook_counts
from typer.testing import CliRunner

from conceptattention import FOLLOWUPS, ConceptAttention, PromptAttention
from conceptattention.families import family_for_pipeline, family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline

NAMES = sorted(p.stem.removeprefix("tiny_family_") for p in Path(__file__).parent.glob("tiny_family_*.py"))


def spec(name: str):
    return importlib.import_module(f"tiny_family_{name}")


def concepts(model, k: int = 3, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, family_for_transformer(model).text_dim(model), generator=g)


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    return spec(request.param)


@pytest.fixture(scope="module")
def wrapped(family):
    pipe = family.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name=f"tiny-{family.FAMILY}")


def test_the_family_is_found_by_transformer_and_pipeline_class(family, wrapped):
    assert family_for_transformer(family.transformer()).name == family.FAMILY
    assert family_for_pipeline(wrapped.pipe).name == family.FAMILY
    assert wrapped.family == family.FAMILY


def test_outputs_are_bit_identical_and_maps_cover_a_non_square_grid_of_batch_two(family):
    model = family.transformer()
    inputs = family.call_inputs(model, batch=2, h=3, w=5)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(model), readouts=["concept_attention", "cross_attention"]) as ca:
            ours = model(**inputs)[0]
    assert torch.equal(plain, ours)
    maps = ca.maps()
    assert maps.shape == (2, 3, 3, 5)
    assert torch.isfinite(maps).all() and torch.isfinite(ca.maps("cross_attention")).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 3, 5))  # softmax over concepts
    assert not torch.allclose(maps[:, 0], maps[:, 1])


def test_stopping_after_the_last_layer_gives_the_full_pass_maps(family):
    model = family.transformer()
    inputs, embeds = family.call_inputs(model, batch=1, h=4, w=3), concepts(model)
    with torch.no_grad():
        with ConceptAttention(model, embeds, layers=[0, 1]) as full:
            model(**inputs)
        with ConceptAttention(model, embeds, layers=[0, 1]) as early:
            early.forward_until_last_layer(**inputs)
    torch.testing.assert_close(early.maps(), full.maps(), rtol=1e-6, atol=1e-7)


def test_no_hook_is_left_after_an_exception(family):
    model = family.transformer()
    before = hook_counts(model)
    inputs = family.call_inputs(model, batch=1)
    block = family_for_transformer(model).double_blocks(model)[0]

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    handle = block.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        with ConceptAttention(model, concepts(model)):
            model(**inputs)
    handle.remove()
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        handle = block.register_forward_pre_hook(boom)
        try:
            with PromptAttention(model, layers=[0]):
                model(**inputs)
        finally:
            handle.remove()
    assert hook_counts(model) == before


def test_generated_image_is_the_plain_pipelines(family, wrapped):
    gen = dict(family.GENERATE)
    res = wrapped.generate("a red dog on grass", ["dog", "grass", "sky"], seed=3, progress=False, **gen)
    call = {"height": gen.pop("height"), "width": gen.pop("width"), "num_inference_steps": gen.pop("steps")}
    if "guidance" in gen:
        call[wrapped.model_family.guidance_argument] = gen.pop("guidance")
    call.update(gen)
    plain = wrapped.pipe(
        prompt="a red dog on grass", generator=torch.Generator().manual_seed(3), output_type="pil", **call
    ).images[0]
    assert np.array_equal(np.asarray(res.image), np.asarray(plain))
    assert res.maps.shape == (3, call["height"], call["width"])
    assert torch.isfinite(res.token_maps).all()
    torch.testing.assert_close(res.token_maps.sum(0), torch.ones(res.token_maps.shape[1:]), rtol=1e-4, atol=1e-4)


def test_encode_with_batched_noise_draws_is_the_mean_of_single_draws(family, wrapped):
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(4)).permute(1, 2, 0).numpy()
    from PIL import Image

    picture = Image.fromarray((image * 255).astype(np.uint8))
    kwargs = dict(caption="a dog", t=0.5, **family.ENCODE)
    batched = wrapped.encode(picture, ["dog", "sky"], samples=3, seed=5, **kwargs)
    singles = torch.stack(
        [wrapped.encode(picture, ["dog", "sky"], samples=1, seed=5 + s, **kwargs).token_maps for s in range(3)]
    )
    torch.testing.assert_close(batched.token_maps, singles.mean(0), rtol=1e-4, atol=1e-5)
    assert batched.settings["family"] == family.FAMILY


def test_prompt_maps_sum_a_words_tokens_and_are_zero_for_an_absent_word(family, wrapped):
    image = torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(6)).numpy()
    from PIL import Image

    picture = Image.fromarray((image * 255).astype(np.uint8))
    maps = wrapped.prompt_maps([picture], ["dog", "tree"], ["a dog on grass"], samples=2, **family.ENCODE)
    assert maps.shape[:2] == (1, 2) and torch.isfinite(maps).all()
    assert maps[0, 0].sum() > 0 and torch.count_nonzero(maps[0, 1]) == 0


def test_cli_generate_and_encode_from_a_saved_model_folder(family, wrapped, tmp_path):
    from conceptattention.cli import app

    folder = tmp_path / "model"
    wrapped.pipe.save_pretrained(folder)
    gen = family.GENERATE
    runner = CliRunner()
    out = tmp_path / "gen"
    result = runner.invoke(
        app,
        ["generate", "a dog on grass", "-c", "dog", "grass", "--model", str(folder), "--out", str(out), "--quiet"]
        + ["--height", str(gen["height"]), "--width", str(gen["width"]), "--steps", str(gen["steps"])],
    )
    assert result.exit_code == 0, result.output
    assert (out / "result.json").is_file() and (out / "image.png").is_file()
    picture = tmp_path / "in.png"
    from PIL import Image

    Image.open(out / "image.png").save(picture)
    enc = tmp_path / "enc"
    result = runner.invoke(
        app,
        ["encode", str(picture), "-c", "dog", "grass", "--model", str(folder), "--out", str(enc), "--quiet"]
        + ["--samples", "2"],
    )
    assert result.exit_code == 0, result.output
    assert (enc / "result.json").is_file()


FAMILY_FREE = [
    "core.py",
    "readouts.py",
    "hooks.py",
    "prompt_attention.py",
    "errors.py",
    "cli.py",
    "app.py",
    "eval",
    "pipelines/__init__.py",
    "pipelines/base.py",
    "pipelines/mmdit.py",
    "pipelines/images.py",
    "pipelines/options.py",
    "pipelines/result.py",
]


def test_no_family_is_named_outside_its_own_file():
    from conceptattention.families import FAMILIES

    package = Path(__file__).parents[1] / "src" / "conceptattention"
    names = set()
    for f in FAMILIES:
        names |= {f.name, *f.transformer_classes, *f.pipeline_classes, *(t.strip() for t in f.title.split("/"))}
        names |= {example.split("/")[0] for example in f.examples}  # the hub owners
    files = [
        p
        for entry in FAMILY_FREE
        for p in ([package / entry] if entry.endswith(".py") else (package / entry).rglob("*.py"))
    ]
    assert len(files) > len(FAMILY_FREE)
    found = {
        (str(p.relative_to(package)), name) for p in files for name in names if name.lower() in p.read_text().lower()
    }
    assert not found, f"family names outside src/conceptattention/families/: {sorted(found)}"


def test_eval_runs_every_method_on_a_real_dataset_format(family, wrapped, tmp_path):
    from tiny_datasets import tiny_voc

    from conceptattention.eval.datasets import load_dataset
    from conceptattention.eval.methods import METHODS
    from conceptattention.eval.runner import evaluate

    root, _ = tiny_voc(tmp_path)
    bench = load_dataset("voc-multi", root)
    results = evaluate(wrapped, bench, "all", limit=1, progress=False, samples=1, size=family.ENCODE["size"])
    assert results is not None
    text = repr(results)
    for name in METHODS:
        assert name in text
    assert "nan" not in text.lower()


def test_the_web_pages_buttons_work(family, wrapped, tmp_path):
    pytest.importorskip("gradio")
    from PIL import Image

    from conceptattention.app import AppHandlers

    class SmallImages:  # the page asks for the model's default size: too big for a tiny model's positions
        def __getattr__(self, name):
            return getattr(wrapped, name)

        def generate(self, *args, **kwargs):
            return wrapped.generate(*args, height=family.GENERATE["height"], width=family.GENERATE["width"], **kwargs)

        def encode(self, *args, **kwargs):
            return wrapped.encode(*args, size=family.ENCODE["size"], **kwargs)

    handlers = AppHandlers(f"tiny-{family.FAMILY}", loader=lambda name, device: SmallImages())
    try:
        image, overlays, segmentation, archive = handlers.generate("a dog on grass", "dog, grass", 1, 0)
        assert len(overlays) == 2 and Path(archive).is_file()
        picture = tmp_path / "in.png"
        Image.new("RGB", (56, 40), (90, 140, 60)).save(picture)
        image, overlays, segmentation, archive = handlers.encode(str(picture), "a dog", "dog, grass", 0.5, 1)
        assert len(overlays) == 2 and Path(archive).is_file()
    finally:
        handlers.close()


def test_every_follow_up_method_runs_and_leaves_the_output_unchanged(family):
    """The follow-ups read the image queries at the points DAAM-style prompt attention reads them (its per-family
    references check those and their RoPE); the chain algebra is checked against explicit matrices in test_core."""
    model = family.transformer()
    inputs = family.call_inputs(model, batch=2, h=3, w=4)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(model), layers=[0], readouts=["concept_attention", *FOLLOWUPS]) as ca:
            ours = model(**inputs)[0]
    assert torch.equal(plain, ours)
    for name in FOLLOWUPS:
        maps = ca.maps(name)
        assert maps.shape == (2, 3, 3, 4) and torch.isfinite(maps).all(), name
    torch.testing.assert_close(ca.maps("bounce_2").sum(1), torch.ones(2, 3, 4))  # still a distribution over concepts
    assert not torch.allclose(ca.maps("bounce_1"), ca.maps())  # the image self-attention moved the map
