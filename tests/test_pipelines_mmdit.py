"""FLUX.1 / SD3 pipelines end to end on tiny random-weight pipelines of the real diffusers classes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

from conceptattention import ConceptAttention, ConceptAttentionError
from conceptattention.pipelines import load_pipeline
from conceptattention.pipelines.mmdit import MMDiTPipeline


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-flux")


@pytest.fixture(scope="module")
def sd3():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-sd3")


GEN = dict(height=32, width=48, steps=3)


@pytest.mark.parametrize("family, guidance", [("flux", 0.0), ("sd3", 2.5)])
def test_generate_image_is_the_plain_pipelines(family, guidance, flux, sd3):
    p = flux if family == "flux" else sd3
    res = p.generate("a dog on grass", ["dog", "grass", "sky"], guidance=guidance, seed=7, **GEN)
    plain = p.pipe(
        "a dog on grass",
        height=32,
        width=48,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(7),
        output_type="pil",
    ).images[0]
    assert np.array_equal(np.asarray(res.image), np.asarray(plain))
    assert res.maps.shape == (3, 32, 48)  # image resolution, non-square
    # 32x48 px -> 16x24 latents (VAE /2) -> Flux packs 2x2 latents per token; this SD3 has patch 1
    assert res.token_maps.shape == ((3, 8, 12) if family == "flux" else (3, 16, 24))
    assert torch.isfinite(res.maps).all()
    assert not torch.allclose(res.maps[0], res.maps[1])
    torch.testing.assert_close(res.maps.sum(0), torch.ones(32, 48), rtol=1e-4, atol=1e-4)


def test_sd3_cfg_maps_come_from_the_conditional_half(sd3):
    embeds = sd3.encode_concepts(["dog", "sky"])
    with ConceptAttention(sd3.transformer, embeds, layers=list(sd3.default_layers)) as ca:
        sd3.pipe(
            "a dog",
            height=32,
            width=48,
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(3),
        )
    both = ca.maps()
    assert both.shape[0] == 2
    res = sd3.generate("a dog", ["dog", "sky"], guidance=3.0, seed=3, height=32, width=48, steps=2)
    torch.testing.assert_close(res.token_maps, both[1].cpu())
    assert not torch.allclose(both[0], both[1])


def test_map_steps_select_denoising_steps(flux):
    a = flux.generate("a dog", ["dog", "tree"], seed=2, map_steps=[0], **GEN)
    b = flux.generate("a dog", ["dog", "tree"], seed=2, map_steps=[2], **GEN)
    ab = flux.generate("a dog", ["dog", "tree"], seed=2, map_steps=[0, 2], **GEN)
    torch.testing.assert_close(ab.token_maps, (a.token_maps + b.token_maps) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_encode_batched_equals_mean_of_single_runs(family, flux, sd3, tmp_path):
    p = flux if family == "flux" else sd3
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(path)
    kw = dict(caption="a photo of a dog", size=(48, 32), t=0.5)
    batched = p.encode(path, ["dog", "grass"], samples=3, seed=5, **kw)
    singles = [p.encode(path, ["dog", "grass"], samples=1, seed=5 + i, **kw) for i in range(3)]
    mean = torch.stack([r.token_maps for r in singles]).mean(0)
    torch.testing.assert_close(batched.token_maps, mean, rtol=1e-5, atol=1e-6)
    assert batched.maps.shape == (2, 32, 48) and batched.image.size == (48, 32)
    assert not torch.allclose(singles[0].token_maps, singles[1].token_maps)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_stopping_early_gives_the_full_pass_maps(family, flux, sd3):
    p = flux if family == "flux" else sd3
    pixels = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    latents = p.model_family.latents(p.pipe, pixels)
    noisy = 0.5 * torch.randn_like(latents) + 0.5 * latents
    inputs = p.model_family.transformer_inputs(p.pipe, noisy, 0.5, "a dog", 0.0, 32)
    embeds = p.encode_concepts(["dog", "tree", "sky"])
    layers = [0, 1]
    with torch.no_grad():
        with ConceptAttention(p.transformer, embeds, layers=layers) as full:
            out = p.transformer(**inputs)[0]
        with ConceptAttention(p.transformer, embeds, layers=layers) as early:
            assert early.forward_until_last_layer(**inputs) is None
    assert torch.isfinite(out).all()
    assert torch.equal(full.maps(), early.maps())


def test_concept_encoding_first_token_mean_and_warning(flux):
    tokens = flux.pipe._get_t5_prompt_embeds(prompt=["dog"], max_sequence_length=256)
    first = flux.encode_concepts(["dog"])
    torch.testing.assert_close(first[0], tokens[0, 0])
    with pytest.warns(UserWarning, match=r"\['skyline'\] are several tokens"):
        flux.encode_concepts(["dog", "skyline"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = flux.encode_concepts(["skyline"], concept_tokens="mean")
    n = len(flux.pipe.tokenizer_2("skyline", add_special_tokens=False).input_ids)
    states = flux.pipe._get_t5_prompt_embeds(prompt=["skyline"], max_sequence_length=256)
    torch.testing.assert_close(mean[0], states[0, :n].mean(0))
    with pytest.raises(ConceptAttentionError, match="tokenize to nothing"):
        flux.encode_concepts(["dog", "   "])
    with pytest.raises(ConceptAttentionError, match="concept list is empty"):
        flux.encode_concepts([])


def test_sd3_without_t5_uses_clip_concepts():
    pipe = tiny_sd3_pipeline(with_t5=False)
    pipe.set_progress_bar_config(disable=True)
    p = MMDiTPipeline(pipe)
    embeds = p.encode_concepts(["dog", "tree"])
    assert embeds.shape == (2, 32) and not torch.allclose(embeds[0], embeds[1])
    res = p.encode(torch.rand(3, 32, 32), ["dog", "tree"], caption="a dog", size=(32, 32), samples=2)
    assert torch.isfinite(res.maps).all()


def test_bad_images_and_conversions(flux, tmp_path):
    broken, empty = tmp_path / "broken.jpg", tmp_path / "empty.png"
    broken.write_bytes(b"\x00\x01 not a jpeg")
    empty.write_bytes(b"")
    with pytest.raises(ConceptAttentionError, match="cannot read .*broken.jpg as an image"):
        flux.encode(broken, ["dog"], size=(32, 32))
    with pytest.raises(ConceptAttentionError, match="image file is empty"):
        flux.encode(empty, ["dog"], size=(32, 32))
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), "red").save(one)
    with pytest.raises(ConceptAttentionError, match="1x1 pixels"):
        flux.encode(one, ["dog"], size=(32, 32))
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    Image.new("L", (50, 30), 90).save(gray)
    Image.new("RGBA", (30, 50), (0, 0, 255, 100)).save(rgba)
    for path in (gray, rgba):
        res = flux.encode(path, ["dog"], samples=1)  # default size: longest side to the model's, grid multiple
        multiple = 2 * flux.pipe.vae_scale_factor  # 16 for real Flux/SD3 VAEs, 4 for this tiny one
        assert res.maps.shape[0] == 1 and res.image.mode == "RGB"
        assert res.image.size[0] % multiple == 0 and res.image.size[1] % multiple == 0
        assert max(res.image.size) == flux.pipe.default_sample_size * flux.pipe.vae_scale_factor


def test_unknown_model_offline_says_how_to_get_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(
        ConceptAttentionError,
        match="could not load the hub model 'someone/no-such-model'.*`hf download "
        "someone/no-such-model --local-dir DIR`",
    ):
        load_pipeline("someone/no-such-model")


def test_a_damaged_local_model_folder_is_one_error_without_download_advice(tmp_path):
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    weights = next((tmp_path / "tiny" / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    with pytest.raises(ConceptAttentionError, match="could not load the diffusers model in .*tiny") as err:
        load_pipeline(str(tmp_path / "tiny"))
    assert "hf download" not in str(err.value) and "\n" not in str(err.value)


def test_saved_tiny_pipeline_loads_from_a_directory(tmp_path):
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"))
    assert isinstance(loaded, MMDiTPipeline) and loaded.family == "flux"
    res = loaded.encode(torch.rand(3, 32, 32), ["dog"], size=(32, 32), samples=1)
    assert res.maps.shape == (1, 32, 32)


def test_cli_runs_a_local_flux_directory(tmp_path):
    from typer.testing import CliRunner

    from conceptattention.cli import app

    tiny_flux_pipeline().save_pretrained(tmp_path / "tiny-flux")
    runner = CliRunner()
    out = tmp_path / "gen"
    r = runner.invoke(
        app,
        [
            "generate",
            "a dog on grass",
            "--concepts",
            "dog",
            "grass",
            "--model",
            str(tmp_path / "tiny-flux"),
            "--height",
            "32",
            "--width",
            "48",
            "--steps",
            "2",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    maps = np.load(out / "maps.npy")
    assert maps.shape == (2, 32, 48) and maps.dtype == np.float32
    assert Image.open(out / "image.png").size == (48, 32)
    r = runner.invoke(
        app,
        [
            "encode",
            str(out / "image.png"),
            "--concepts",
            "dog",
            "--caption",
            "a dog",
            "--model",
            str(tmp_path / "tiny-flux"),
            "--size",
            "48x32",
            "--samples",
            "2",
            "--out",
            str(tmp_path / "enc"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "enc" / "maps.npy").shape == (1, 32, 48)
    r = runner.invoke(
        app,
        [
            "encode",
            str(out / "image.png"),
            "--concepts",
            "dog",
            "--model",
            str(tmp_path / "tiny-flux"),
            "--size",
            "big",
        ],
    )
    assert r.exit_code == 2 and "--size must look like 1024x768" in r.output


def test_flux_word_positions_follow_the_tokenizer(flux):
    pipe = flux
    caption = "a red dog on the grass"
    ids = pipe.pipe.tokenizer_2(caption).input_ids
    for word in ("dog", "grass", "red"):
        positions = pipe.word_positions(caption, word)
        word_ids = pipe.pipe.tokenizer_2(word, add_special_tokens=False).input_ids
        assert positions and [ids[p] for p in positions] == word_ids
    assert pipe.word_positions(caption, "cat") == []
    assert pipe.word_positions(caption, "Dog") == pipe.word_positions(caption, "dog")
    # T5 truncation keeps its end token in the last slot: a word cut there has no position
    ids = pipe.pipe.tokenizer_2(caption, max_length=5, truncation=True).input_ids  # a red dog on </s>
    assert ids[-1] == pipe.pipe.tokenizer_2.eos_token_id
    assert pipe.word_positions(caption, "on", max_sequence_length=5) == [3]
    assert pipe.word_positions(caption, "the", max_sequence_length=5) == []  # its slot holds </s>
