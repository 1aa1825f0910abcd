"""What every video family must do, on each one's tiny random-weight models of the real classes.

Each video family contributes ``tests/tiny_video_<name>.py`` (its tiny transformer, call inputs on a
frames x rows x columns grid, and pipeline, built offline); the checks here are the same for all. A
family's own numbers against an independent recomputation live in ``tests/test_families_<name>.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import hook_counts

from conceptattention import FOLLOWUPS, ConceptAttention
from conceptattention.families import family_for_pipeline, family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline

iio = pytest.importorskip("imageio.v3")
pytest.importorskip("imageio_ffmpeg")

NAMES = sorted(p.stem.removeprefix("tiny_video_") for p in Path(__file__).parent.glob("tiny_video_*.py"))
if not NAMES:
    pytest.skip("no video family yet", allow_module_level=True)


def concepts(model, k: int = 3, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, family_for_transformer(model).text_dim(model), generator=g)


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    return importlib.import_module(f"tiny_video_{request.param}")


@pytest.fixture(scope="module")
def wrapped(family):
    pipe = family.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name=f"tiny-{family.FAMILY}")


def test_the_family_is_a_video_family_found_by_class(family, wrapped):
    assert family_for_transformer(family.transformer()).name == family.FAMILY
    assert family_for_pipeline(wrapped.pipe).video and "frames" in wrapped.options


def test_maps_cover_frames_rows_and_columns_and_outputs_are_bit_identical(family):
    model = family.transformer()
    inputs = family.call_inputs(model, batch=2, f=2, h=3, w=5)
    before = hook_counts(model)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(model), readouts=["concept_attention", "cross_attention"]) as ca:
            ours = model(**inputs)[0]
    assert torch.equal(plain, ours) and hook_counts(model) == before
    maps = ca.maps()
    assert maps.shape == (2, 3, 2, 3, 5)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 2, 3, 5))
    assert torch.isfinite(ca.maps("cross_attention")).all()


def test_stopping_after_the_last_layer_gives_the_full_pass_maps(family):
    model = family.transformer()
    inputs, embeds = family.call_inputs(model, batch=1, f=3, h=2, w=4), concepts(model)
    with torch.no_grad():
        with ConceptAttention(model, embeds, layers=[0, 1]) as full:
            model(**inputs)
        with ConceptAttention(model, embeds, layers=[0, 1]) as early:
            early.forward_until_last_layer(**inputs)
    torch.testing.assert_close(early.maps(), full.maps(), rtol=1e-6, atol=1e-7)


def test_the_generated_video_is_the_plain_pipelines(family, wrapped):
    gen = dict(family.GENERATE)
    res = wrapped.generate("a dog running on grass", ["dog", "grass"], seed=3, progress=False, **gen)
    call = {"height": gen.pop("height"), "width": gen.pop("width"), "num_inference_steps": gen.pop("steps")}
    call[wrapped.model_family.frames_argument] = gen.pop("frames")
    if "guidance" in gen:
        call[wrapped.model_family.guidance_argument] = gen.pop("guidance")
    call.update(gen)
    plain = wrapped.pipe(
        prompt="a dog running on grass", generator=torch.Generator().manual_seed(3), output_type="np", **call
    ).frames[0]
    expected = (np.clip(np.asarray(plain), 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(res.frames, expected)
    t = len(expected)
    assert res.maps.shape == (2, t, call["height"], call["width"]) and res.token_maps.ndim == 4
    torch.testing.assert_close(res.token_maps.sum(0), torch.ones(res.token_maps.shape[1:]), rtol=1e-4, atol=1e-4)


def test_encode_of_a_video_file_batched_equals_single_draws_and_writes_videos(family, wrapped, tmp_path):
    w, h = family.ENCODE["size"]
    y, x = np.mgrid[0:h, 0:w]
    video = np.stack([np.stack([255 * x // w, 255 * y // h, np.full_like(x, 40 * i)], -1) for i in range(9)])
    path = tmp_path / "in.mp4"
    iio.imwrite(path, video.astype(np.uint8), fps=8, codec="libx264", macro_block_size=1)
    kwargs = dict(caption="a dog", t=0.5, **family.ENCODE)
    batched = wrapped.encode(path, ["dog", "sky"], samples=3, seed=5, **kwargs)
    singles = torch.stack(
        [wrapped.encode(path, ["dog", "sky"], samples=1, seed=5 + s, **kwargs).token_maps for s in range(3)]
    )
    torch.testing.assert_close(batched.token_maps, singles.mean(0), rtol=1e-4, atol=1e-5)
    frames = batched.settings["frames"]
    assert frames == wrapped.model_family.valid_frames(wrapped.pipe, min(9, family.ENCODE.get("frames", 9)))
    assert batched.settings["frames_given"] == 9 and batched.frames.shape == (frames, h, w, 3)
    written = batched.save(tmp_path / "out")
    for name in ("video", "overlay:dog", "overlay:sky"):
        assert iio.imread(written[name]).shape == (frames, h, w, 3)
    assert np.load(written["maps"]).shape == (2, frames, h, w)


def test_the_web_pages_video_buttons_play_the_overlays(family, wrapped, tmp_path):
    pytest.importorskip("gradio")
    from conceptattention.app import AppHandlers

    class Small:  # the page asks for the model's default size and length: too big for a tiny model
        def __getattr__(self, name):
            return getattr(wrapped, name)

        def generate(self, *args, **kwargs):
            gen = family.GENERATE
            return wrapped.generate(*args, height=gen["height"], width=gen["width"], frames=gen["frames"], **kwargs)

        def encode(self, *args, **kwargs):
            return wrapped.encode(*args, **family.ENCODE, **kwargs)

    handlers = AppHandlers(f"tiny-{family.FAMILY}", loader=lambda name, device: Small())
    try:
        _, overlays, sheet, archive = handlers.generate("a dog on grass", "dog, grass", 2, 0)
        assert [c for _, c in overlays] == ["dog", "grass"] and all(p.endswith(".mp4") for p, _ in overlays)
        assert all(Path(p).is_file() for p, _ in overlays) and Path(archive).is_file()
        w, h = family.ENCODE["size"]
        path = tmp_path / "in.gif"
        moving = np.stack([np.full((h, w, 3), 40 * i, np.uint8) for i in range(5)])  # distinct: a gif keeps them
        iio.imwrite(path, moving, duration=100, loop=0)
        _, overlays, sheet, archive = handlers.encode(str(path), "a dog", "dog, grass", 0.5, 1)
        expected = wrapped.model_family.valid_frames(wrapped.pipe, min(5, family.ENCODE.get("frames", 5)))
        assert len(iio.imread(overlays[0][0])) == expected
    finally:
        handlers.close()


def test_cli_generates_and_encodes_videos_from_a_saved_model_folder(family, wrapped, tmp_path):
    from typer.testing import CliRunner

    from conceptattention.cli import app

    folder = tmp_path / "model"
    wrapped.pipe.save_pretrained(folder)
    gen, runner = family.GENERATE, CliRunner()
    sizes = ["--height", str(gen["height"]), "--width", str(gen["width"]), "--frames", str(gen["frames"])]
    args = ["generate", "a dog", "-c", "dog", "grass", "--model", str(folder), "--steps", "2", "--quiet"]
    result = runner.invoke(app, [*args, *sizes, "--out", str(tmp_path / "gen")])
    assert result.exit_code == 0, result.output
    video = iio.imread(tmp_path / "gen" / "video.mp4")
    w, h = family.ENCODE["size"]
    args = ["encode", str(tmp_path / "gen" / "video.mp4"), "-c", "dog", "grass", "--model", str(folder), "--quiet"]
    result = runner.invoke(app, [*args, "--size", f"{w}x{h}", "--samples", "1", "--out", str(tmp_path / "enc")])
    assert result.exit_code == 0, result.output
    encoded = iio.imread(tmp_path / "enc" / "video.mp4")
    assert encoded.shape[1:] == (h, w, 3)
    assert len(encoded) == wrapped.model_family.valid_frames(wrapped.pipe, len(video))


def test_a_video_too_large_for_the_device_is_one_clear_error(family, wrapped, tmp_path):
    from conceptattention.errors import ConceptAttentionError

    block = wrapped.model_family.double_blocks(wrapped.transformer)[0]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    w, h = family.ENCODE["size"]
    video = np.stack([np.full((h, w, 3), 30 * i, np.uint8) for i in range(5)])
    before = hook_counts(wrapped.transformer)
    handle = block.register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(ConceptAttentionError, match="too large for this device .* fewer frames"):
            wrapped.encode(video, ["dog"], samples=1, **family.ENCODE)
    finally:
        handle.remove()
    assert hook_counts(wrapped.transformer) == before


def test_every_follow_up_method_runs_and_leaves_the_output_unchanged(family):
    """The follow-ups read the image queries at the points DAAM-style prompt attention reads them (its per-family
    references check those and their RoPE); the chain algebra is checked against explicit matrices in test_core."""
    model = family.transformer()
    inputs = family.call_inputs(model, batch=2, f=2, h=3, w=2)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(model), layers=[0], readouts=["concept_attention", *FOLLOWUPS]) as ca:
            ours = model(**inputs)[0]
    assert torch.equal(plain, ours)
    for name in FOLLOWUPS:
        maps = ca.maps(name)
        assert maps.shape == (2, 3, 2, 3, 2) and torch.isfinite(maps).all(), name
    torch.testing.assert_close(ca.maps("bounce_2").sum(1), torch.ones(2, 2, 3, 2))  # still a distribution over concepts
    assert not torch.allclose(ca.maps("bounce_1"), ca.maps())  # the image self-attention moved the map
