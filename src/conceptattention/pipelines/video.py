"""Videos in and out, and the result of a video family: frames, maps through time, the files written.

Reading and writing go through imageio and its ffmpeg plugin (``pip install "conceptattention[video]"``):
a video file (mp4, webm, gif, ...) or a folder of frame images in, ``video.mp4`` and one overlay video
per concept out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConceptAttentionError, short
from .result import overlay_names, save_all_or_nothing, with_readout_settings

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
#: Files the CLI reads as videos (a folder of frames is one too).
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".m4v"}
VIDEO_EXTRA = 'video files need imageio and its ffmpeg plugin: pip install "conceptattention[video]"'


def is_video_path(path: Path) -> bool:
    """Whether the CLI reads ``path`` as a video: a video file's suffix, or a folder holding frame images."""
    if path.is_dir():
        return any(p.suffix.lower() in FRAME_SUFFIXES for p in path.iterdir())
    return path.suffix.lower() in VIDEO_SUFFIXES


def _imageio() -> Any:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ConceptAttentionError(VIDEO_EXTRA) from None
    return iio


def load_video(source: Any) -> np.ndarray:
    """A video as uint8 RGB frames ``[T, H, W, 3]``: a file imageio reads, a folder of frame images (in
    name order), a list of PIL images, or an array ``[T, H, W, 3]`` (uint8, or floats in [0, 1])."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ConceptAttentionError(f"video not found: {short(str(path))}")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not files:
                raise ConceptAttentionError(f"the folder {short(str(path))} holds no frame images (png, jpg, ...)")
            frames = [np.asarray(Image.open(p).convert("RGB")) for p in files]
            if len({f.shape for f in frames}) > 1:
                raise ConceptAttentionError(f"the frames in {short(str(path))} are not all the same size")
            return _checked(np.stack(frames), str(path))
        try:
            array = _imageio().imread(path)
        except ConceptAttentionError:
            raise
        except Exception as err:  # noqa: BLE001 - every codec and container fails in its own way
            raise ConceptAttentionError(
                f"could not read the video {short(str(path))} ({type(err).__name__}); give an mp4, webm or gif "
                "file that plays, or a folder of frames"
            ) from None
        return _checked(array, str(path))
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], Image.Image):
        return _checked(np.stack([np.asarray(f.convert("RGB")) for f in source]), "the frames")
    array = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return _checked(array, "the frames")


def _checked(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim == 3:  # one grayscale video or a single RGB frame: ambiguous, so only RGB frames are taken
        array = array[None] if array.shape[-1] == 3 else np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 4 or array.shape[-1] not in (3, 4):
        raise ConceptAttentionError(f"{short(what)} is not a video of RGB frames (shape {tuple(array.shape)})")
    if array.shape[0] == 0:
        raise ConceptAttentionError(f"{short(what)} has no frames")
    return np.ascontiguousarray(array[..., :3])


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """``[T, H, W, 3]`` uint8 frames to an H.264 mp4 (yuv420p, so every player opens it)."""
    _imageio().imwrite(
        path, frames, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_params=["-pix_fmt", "yuv420p"]
    )


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[3, T, H', W']`` in [0, 1] at ``size`` = (W', H'), bicubic per frame."""
    resized = [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames]
    return torch.from_numpy(np.stack(resized)).permute(3, 0, 1, 2).float() / 255


def upsample_video(token_maps: torch.Tensor, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """``[K, F, h, w]`` -> ``[K, T, H, W]`` trilinear (sums over concepts are kept); ``size`` = (H, W)."""
    return F.interpolate(token_maps[None].float(), size=(frames, *size), mode="trilinear", align_corners=False)[0]


@dataclass
class VideoResult:
    """A video and one saliency map per concept through time.

    ``frames`` is uint8 ``[T, H, W, 3]``; ``maps`` ``[K, T, H, W]`` float32 at the video's resolution;
    ``token_maps`` ``[K, F, h, w]`` on the latent frame grid; ``raw_token_maps`` the scores before the
    softmax over concepts (when recorded); ``extra_maps`` other readouts (name -> ``[K, T, H, W]``).
    """

    frames: np.ndarray
    maps: torch.Tensor
    token_maps: torch.Tensor
    concepts: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    extra_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_token_maps: torch.Tensor | None = None
    fps: int = 16

    def __getitem__(self, concept: str) -> torch.Tensor:
        """The map of ``concept``, ``[T, H, W]`` float32."""
        if concept not in self.concepts:
            raise KeyError(f"no concept {concept!r} in this result; its concepts are {self.concepts}")
        return self.maps[self.concepts.index(concept)].float()

    def __contains__(self, concept: object) -> bool:
        return isinstance(concept, str) and concept in self.concepts

    def __len__(self) -> int:
        return len(self.concepts)

    def __repr__(self) -> str:
        t, h, w = self.frames.shape[:3]
        grid = "x".join(str(n) for n in self.token_maps.shape[1:])
        return f"VideoResult(concepts={self.concepts}, video={t}x{w}x{h}, token_grid={grid}, model={self.settings.get('model')!r})"

    @property
    def image(self) -> Image.Image:
        """The first frame (what a picture of the result shows)."""
        return Image.fromarray(self.frames[0])

    def save(self, out: Path) -> dict[str, Path]:
        """Write video.mp4, one ``<concept>.mp4`` overlay video per concept, grid.png (frames x concepts),
        maps.npy ``[K, T, H, W]`` (and maps_raw.npy ``[K, F, h, w]``) and result.json into ``out``; all or
        nothing, as :meth:`ConceptResult.save <conceptattention.pipelines.result.ConceptResult.save>`."""
        _imageio()  # a missing plugin fails before anything is written
        info = {
            "concepts": self.concepts,
            "maps_shape": list(self.maps.shape),
            "token_grid": list(self.token_maps.shape[1:]),
            "video_size": [int(self.frames.shape[2]), int(self.frames.shape[1])],
            "frames": int(self.frames.shape[0]),
            "fps": self.fps,
        }
        return save_all_or_nothing(out, self.maps, self.raw_token_maps, {**info, **self.settings}, self._write)

    def _write(self, folder: Path, maps: torch.Tensor, raw: torch.Tensor | None, info: dict) -> dict[str, str]:
        from ..viz import colorize

        names = {"video": "video.mp4", "maps": "maps.npy"}
        write_video(folder / names["video"], self.frames, self.fps)
        np.save(folder / names["maps"], maps.numpy().astype(np.float32))
        if raw is not None:
            names["maps_raw"] = "maps_raw.npy"
            np.save(folder / names["maps_raw"], raw.numpy().astype(np.float32))
        for k, (concept, name) in enumerate(zip(self.concepts, overlay_names(self.concepts))):
            video_name = name[: -len(".png")] + ".mp4"
            names[f"overlay:{concept}"] = video_name
            lo, hi = float(maps[k].min()), float(maps[k].max())  # one colour range for the whole video
            scaled = ((maps[k] - lo) / (hi - lo) if hi > lo else torch.zeros_like(maps[k])).numpy()
            heat = colorize(scaled).astype(np.float32)  # [T, H, W, 3]
            blended = (0.45 * self.frames.astype(np.float32) + 0.55 * heat).round().astype(np.uint8)
            write_video(folder / video_name, blended, self.fps)
        names["grid"] = "grid.png"
        contact_sheet(self.frames, maps, self.concepts).save(folder / names["grid"])
        names["result"] = "result.json"
        info["files"] = dict(names)
        (folder / names["result"]).write_text(json.dumps(info, indent=2, allow_nan=False))
        return names


def contact_sheet(frames: np.ndarray, maps: torch.Tensor, concepts: list[str], rows: int = 4) -> Image.Image:
    """Frames x concepts: up to ``rows`` evenly spaced frames, each a row of the frame and its overlays."""
    from ..viz import concept_grid

    picks = np.unique(np.linspace(0, len(frames) - 1, min(rows, len(frames))).round().astype(int))
    sheets = [concept_grid(Image.fromarray(frames[t]), maps[:, t], concepts) for t in picks]
    sheet = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), "white")
    y = 0
    for s in sheets:
        sheet.paste(s, (0, y))
        y += s.height
    return sheet


def video_result(
    frames: np.ndarray,
    token_maps: dict[str, torch.Tensor],
    concepts: list[str],
    settings: dict[str, Any],
    fps: int,
) -> VideoResult:
    """A result from ``{readout: [K, F, h, w]}`` token maps; the first readout is the main one."""
    t, h, w = frames.shape[:3]
    all_maps = {name: m.float().cpu() for name, m in token_maps.items()}
    raw_names = [n for n in all_maps if n.endswith("/raw")]
    raw = all_maps.pop(raw_names[-1]) if raw_names else None
    main = all_maps.pop(next(iter(all_maps)))
    return VideoResult(
        frames=frames,
        maps=upsample_video(main, t, (h, w)),
        token_maps=main,
        concepts=concepts,
        settings=with_readout_settings(settings),
        extra_maps={k: upsample_video(v, t, (h, w)) for k, v in all_maps.items()},
        raw_token_maps=raw,
        fps=fps,
    )
