"""Videos in and out (pipelines/video.py): reading files and frame folders, refusing bad ones, and the files a
video result writes, decoded back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention.errors import ConceptAttentionError

iio = pytest.importorskip("imageio.v3")
pytest.importorskip("imageio_ffmpeg")

from conceptattention.pipelines.video import (  # noqa: E402
    contact_sheet,
    load_video,
    resize_frames,
    upsample_video,
    video_result,
)


def frames(t=5, h=24, w=40) -> np.ndarray:
    """Smooth colour ramps with a bright square moving right: frames a lossy codec keeps close."""
    y, x = np.mgrid[0:h, 0:w]
    video = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        video[i, ..., 0], video[i, ..., 1], video[i, ..., 2] = 255 * x // w, 255 * y // h, 128
        video[i, 6:14, 4 + 4 * i : 12 + 4 * i] = 240
    return video


def test_a_file_a_folder_of_frames_and_arrays_read_alike(tmp_path):
    video = frames()
    iio.imwrite(tmp_path / "v.gif", video, duration=100, loop=0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(video):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    assert np.array_equal(load_video(folder), video)  # lossless frames, in name order
    gif = load_video(tmp_path / "v.gif")
    assert gif.shape == video.shape and gif.dtype == np.uint8
    assert np.array_equal(load_video(video), video)
    assert np.array_equal(load_video(video.astype(np.float32) / 255), video)
    assert np.array_equal(load_video([Image.fromarray(f) for f in video]), video)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "could not read the video"),
        (lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 40), "could not read the video"),
        (lambda p: None, "video not found"),
    ],
    ids=["empty-file", "corrupt-file", "missing"],
)
def test_a_bad_video_file_is_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(ConceptAttentionError, match=message):
        load_video(path)


def test_zero_frames_and_odd_shapes_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptAttentionError, match="holds no frame images"):
        load_video(tmp_path / "empty")
    with pytest.raises(ConceptAttentionError, match="has no frames"):
        load_video(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ConceptAttentionError, match="not a video of RGB frames"):
        load_video(np.zeros((2, 8, 8, 5), np.uint8))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (8, 9)).save(mixed / "b.png")
    with pytest.raises(ConceptAttentionError, match="not all the same size"):
        load_video(mixed)


def test_upsampling_through_time_keeps_per_pixel_sums_and_sizes():
    token = torch.rand(3, 2, 4, 5)
    token = token / token.sum(0, keepdim=True)
    maps = upsample_video(token, 7, (16, 20))
    assert maps.shape == (3, 7, 16, 20)
    torch.testing.assert_close(maps.sum(0), torch.ones(7, 16, 20))
    pixels = resize_frames(frames(3, 24, 40), (20, 12))
    assert pixels.shape == (3, 3, 12, 20) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1


def test_a_video_result_writes_files_that_decode_back(tmp_path):
    video = frames(5, 24, 40)
    token = torch.rand(2, 2, 3, 5).softmax(0)
    result = video_result(video, {"concept_attention": token}, ["dog", "video"], {"model": "tiny"}, fps=8)
    assert result.maps.shape == (2, 5, 24, 40) and result["dog"].shape == (5, 24, 40)
    written = result.save(tmp_path / "out")
    for name, expected_frames in (("video", 5), ("overlay:dog", 5), ("overlay:video", 5)):
        back = iio.imread(written[name])
        assert back.shape == (expected_frames, 24, 40, 3), name
    assert written["overlay:video"].name == "video_2.mp4"  # never overwrites video.mp4
    assert np.load(written["maps"]).shape == (2, 5, 24, 40)
    info = json.loads(written["result"].read_text())
    assert info["frames"] == 5 and info["fps"] == 8 and info["token_grid"] == [2, 3, 5]
    sheet = Image.open(written["grid"])
    assert sheet.size == contact_sheet(video, result.maps, result.concepts).size
    # the decoded video is the frames (lossy codec: close, not equal)
    assert np.abs(iio.imread(written["video"]).astype(int) - video.astype(int)).mean() < 12


def test_non_finite_maps_write_nothing(tmp_path):
    token = torch.rand(1, 2, 3, 5)
    token[0, 0, 0, 0] = float("nan")
    result = video_result(frames(3), {"concept_attention": token}, ["dog"], {}, fps=8)
    with pytest.raises(ConceptAttentionError, match="NaN or infinite"):
        result.save(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
