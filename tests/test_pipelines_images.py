"""Images in (pipelines/images.py): 16-bit and float images keep their values, every PIL mode becomes RGB, a
photo's EXIF rotation is applied, bad paths say what is wrong, a non-square image is centre-cropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention.errors import ConceptAttentionError
from conceptattention.pipelines.images import fit_square, open_image


def test_16_bit_and_float_images_keep_their_values(tmp_path):
    gradient = (np.arange(48 * 40).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246 across the image
    path = tmp_path / "gray16.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode == "I;16"  # a real 16-bit PNG
    expected = np.round(gradient / 257.0)
    for source in (
        path,
        Image.open(path),
        gradient,
        torch.from_numpy(gradient.astype(np.int32)),
        Image.frombytes("I;16B", (48, 40), gradient.astype(">u2").tobytes()),
        Image.fromarray(gradient.astype(np.int32)),  # PIL mode "I" (32-bit) with 16-bit values
        Image.fromarray((gradient / 65535.0).astype(np.float32)),
    ):  # mode "F" in [0, 1]
        rgb = np.asarray(open_image(source)).astype(int)
        assert rgb.shape == (40, 48, 3) and (rgb[..., 0] == rgb[..., 2]).all()
        assert np.abs(rgb[..., 0] - expected).max() <= 1, type(source)
        assert rgb.min() == 0 and rgb.max() >= 252  # not a constant (all white) image
    wide = Image.fromarray((gradient.astype(np.int32) - 40000) * 1000)  # "I" beyond 16 bits: min-max
    rgb = np.asarray(open_image(wide))[..., 0].astype(int)
    span = (gradient.astype(float) - gradient.min()) / (gradient.max() - gradient.min()) * 255
    assert np.abs(rgb - span).max() <= 1
    hdr = Image.fromarray((gradient / 1000.0 - 10).astype(np.float32))  # "F" outside [0, 1]: min-max
    assert np.abs(np.asarray(open_image(hdr))[..., 0].astype(int) - span).max() <= 1
    small = np.arange(64, dtype=np.int64).reshape(8, 8) * 4  # other integers with 8-bit values stay as they are
    assert (np.asarray(open_image(small))[..., 1] == small).all()
    assert (np.asarray(open_image(np.eye(4, dtype=bool)))[..., 0] == np.eye(4) * 255).all()
    floats = np.linspace(0, 1, 3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # [C, H, W] in [0, 1]
    assert np.abs(np.asarray(open_image(floats)).astype(int) - np.round(floats.transpose(1, 2, 0) * 255)).max() <= 1


def test_every_pil_mode_converts_to_rgb():
    def pixel(img):
        return tuple(int(v) for v in np.asarray(open_image(img))[0, 0])

    assert pixel(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (255, 0, 0)  # no cyan ink: red
    assert pixel(Image.new("CMYK", (4, 4), (0, 0, 0, 255))) == (0, 0, 0)
    assert pixel(Image.new("1", (4, 4), 1)) == (255, 255, 255) and pixel(Image.new("1", (4, 4), 0)) == (0, 0, 0)
    assert pixel(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    ycc = Image.new("RGB", (4, 4), (200, 30, 90)).convert("YCbCr")
    assert np.abs(np.subtract(pixel(ycc), (200, 30, 90))).max() <= 3
    assert pixel(Image.new("LA", (4, 4), (0, 0))) == (255, 255, 255)  # fully transparent: the white background
    assert pixel(Image.new("LA", (4, 4), (0, 255))) == (0, 0, 0)
    assert np.abs(np.subtract(pixel(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), (127, 127, 127))).max() <= 1
    assert np.abs(np.subtract(pixel(Image.new("La", (4, 4), (0, 128))), (127, 127, 127))).max() <= 1
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    assert pixel(palette) == (0, 0, 255)
    palette.info["transparency"] = 1  # palette entry 1 transparent
    assert pixel(palette) == (255, 255, 255)
    rgba_palette = Image.new("P", (4, 4), 0)
    rgba_palette.putpalette([0, 0, 0, 0], "RGBA")  # a palette with alpha: entry 0 fully transparent
    assert pixel(rgba_palette) == (255, 255, 255)
    keyed = Image.new("RGB", (4, 4), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)  # a colour key (PNG tRNS)
    assert pixel(keyed) == (255, 255, 255)
    assert pixel(Image.new("HSV", (4, 4), (0, 255, 255))) == (255, 0, 0)
    assert min(pixel(Image.new("LAB", (4, 4), (255, 128, 128)))) >= 250  # L = 100, a = b = 0: white


def test_image_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(ConceptAttentionError, match="is a directory, not an image file: .*"):
        open_image(tmp_path)
    with pytest.raises(ConceptAttentionError, match="image file not found: .*missing.png"):
        open_image(tmp_path / "missing.png")


def test_a_photo_s_exif_rotation_is_applied(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    Image.fromarray(wide).save(tmp_path / "phone.png", exif=exif)
    shown = open_image(tmp_path / "phone.png")
    assert shown.size == (20, 40)  # displayed upright: 20 wide, 40 tall
    top = np.asarray(shown)[:20]
    assert (top == (255, 0, 0)).all()  # the red left half is now on top


def test_fit_square_center_crops_before_resizing():
    image = np.zeros((200, 300, 3), np.uint8)
    image[:, :50], image[:, 50:250], image[:, 250:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    pixels, done = fit_square(Image.fromarray(image), 64)
    assert pixels.shape == (3, 64, 64) and done == "center-crop 300x200 to 200x200, resized to 64x64"
    assert torch.equal(pixels, torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 64, 64))  # only the centre
    tall = fit_square(Image.fromarray(np.zeros((65, 64, 3), np.uint8)), 64)[1]
    assert tall == "center-crop 64x65 to 64x64"
    assert fit_square(Image.new("RGB", (128, 128)), 64)[1] == "resized 128x128 to 64x64"
    assert fit_square(Image.new("RGB", (64, 64)), 64)[1] == "unchanged (64x64)"
