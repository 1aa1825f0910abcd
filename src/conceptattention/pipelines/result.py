"""The result every pipeline returns, and how it is written to disk."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import __version__
from ..errors import ConceptAttentionError, short
from ..readouts import parse_readout, resolve_readouts

if TYPE_CHECKING:  # matplotlib is optional: imported only inside plot()
    from matplotlib.figure import Figure


RESERVED = {"image", "video", "maps", "maps_raw", "grid", "segmentation", "result"}


def overlay_names(concepts: list[str]) -> list[str]:
    """A distinct, safe file name per concept (``dog.png``; clashes get ``_2``, ``_3``...)."""
    from ..viz import safe_name

    used, names = set(RESERVED), []
    for concept in concepts:
        stem = safe_name(concept)
        candidate, n = stem, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate.lower())
        names.append(candidate + ".png")
    return names


def with_readout_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` plus every field of its main readout (``readout_settings``), when it names one by a string."""
    name = settings.get("readout")
    if not isinstance(name, str) or "readout_settings" in settings:
        return settings
    return {**settings, "readout_settings": parse_readout(name).settings()}


def with_raw(readouts: Sequence[Any]) -> list[Any]:
    """``readouts`` plus the main readout without its softmax over concepts, for ``maps_raw.npy``
    (same stream and space: computed in the same pass at no extra cost; its name ends in "/raw")."""
    main = next(iter(resolve_readouts(list(readouts)).values()))
    return [*readouts, replace(main, softmax=False, concept_norm="none")]


@dataclass
class ConceptResult:
    """An image and one saliency map per concept.

    ``maps`` is ``[K, H, W]`` float32 at the image's resolution (ConceptAttention saliency: softmax
    over concepts, mean over layers and steps); ``token_maps`` the same on the token grid ``[K, h, w]``;
    ``raw_token_maps`` the scores before the softmax over concepts ``[K, h, w]`` (when recorded).
    ``extra_maps`` holds other recorded readouts (name -> ``[K, H, W]``).
    """

    image: Image.Image
    maps: torch.Tensor
    token_maps: torch.Tensor
    concepts: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    extra_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_token_maps: torch.Tensor | None = None

    # -- a mapping from concept to map, for notebooks: result["dog"], "dog" in result, for c in result --

    def _index(self, concept: str) -> int:
        if not isinstance(concept, str):
            raise TypeError(
                f"a result is indexed by concept name, one of {self.concepts}, not by "
                f"{type(concept).__name__}; for the k-th map use result.maps[k]"
            )
        try:
            return self.concepts.index(concept)
        except ValueError:
            raise KeyError(f"no concept {concept!r} in this result; its concepts are {self.concepts}") from None

    def __getitem__(self, concept: str) -> torch.Tensor:
        """The map of ``concept``, ``[H, W]`` float32 at the image's resolution (``maps[k]``)."""
        return self.maps[self._index(concept)].float()

    def token_map(self, concept: str) -> torch.Tensor:
        """The map of ``concept`` on the token grid, ``[h, w]`` (``token_maps[k]``)."""
        return self.token_maps[self._index(concept)].float()

    def __contains__(self, concept: object) -> bool:
        return isinstance(concept, str) and concept in self.concepts

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.concepts))

    def __repr__(self) -> str:
        """Short: the concepts (the first few of many), image size, token grid and model; never the tensors."""
        names = [short(c, 40) for c in self.concepts]
        if len(names) > 8:
            names = [*names[:6], "...", names[-1]]
        concepts = "[" + ", ".join(names) + "]"
        if len(self.concepts) > 8:
            concepts += f" ({len(self.concepts)} concepts)"
        w, h = self.image.size
        grid = "x".join(str(n) for n in self.token_maps.shape[1:])
        model = self.settings.get("model") if isinstance(self.settings, dict) else None
        return f"ConceptResult(concepts={concepts}, image={w}x{h}, token_grid={grid}, model={model!r})"

    def _repr_png_(self) -> bytes:
        """The picture Jupyter shows for a result: the grid of :func:`~conceptattention.viz.concept_grid`."""
        from ..viz import concept_grid

        buffer = io.BytesIO()
        concept_grid(self.image, self.maps.detach().float().cpu(), self.concepts).save(buffer, format="PNG")
        return buffer.getvalue()

    def plot(self, concepts: str | Sequence[str] | None = None, cols: int | None = None, cmap: Any = None) -> Figure:
        """A matplotlib ``Figure``: the image, then one titled overlay per concept (all, or those named), in rows
        of ``cols`` panels (default: up to 4 a row); ``cmap`` a matplotlib colour map (default viridis).

        Each overlay shows the map over its own range (min to max), as the saved pictures do. The figure is made
        without pyplot, so it needs no display and changes no global state; save it with ``fig.savefig(path)``.
        Needs matplotlib: ``pip install "conceptattention[plot]"``.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ConceptAttentionError(
                'result.plot() needs matplotlib: pip install "conceptattention[plot]"'
            ) from None
        from ..viz import DEFAULT_CMAP

        if concepts is None:
            chosen = list(self.concepts)
        else:
            chosen = [concepts] if isinstance(concepts, str) else list(concepts)
        maps = [self[c].detach().cpu().numpy() for c in chosen]  # an unknown concept: KeyError naming them all
        panels = 1 + len(chosen)
        if cols is None:
            cols = min(panels, 4)
        if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
            raise ConceptAttentionError(f"cols must be a whole number of at least 1, not {cols!r}")
        cols = min(cols, panels)
        rows = -(-panels // cols)
        w, h = self.image.size
        side = 3.0
        fig = Figure(figsize=(side * cols, rows * (side * h / w + 0.4)), layout="constrained")
        picture = np.asarray(self.image.convert("RGB"))
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # the map over the image, whatever its resolution
        for i, (title, heat) in enumerate(zip(["image", *chosen], [None, *maps])):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(picture)
            if heat is not None:
                ax.imshow(
                    heat,
                    cmap=DEFAULT_CMAP if cmap is None else cmap,
                    alpha=0.55,
                    extent=extent,
                    interpolation="bilinear",
                )
            ax.set_title(title)
            ax.set_axis_off()
        return fig

    def save(self, out: Path) -> dict[str, Path]:
        """Write image.png, maps.npy, maps_raw.npy, one ``<concept>.png`` overlay per concept, grid.png,
        segmentation.png and result.json into the folder ``out``; returns the paths written.

        All or nothing: the files are written into a temporary folder beside ``out`` that then takes
        its place, so an error or an interrupt leaves no half-written result and an earlier result in
        ``out`` intact. An earlier result in ``out`` is replaced whole; a folder holding anything else
        is refused (see :func:`check_out_dir`). Maps holding NaN or infinities are refused, not written.
        """
        info = {
            "concepts": self.concepts,
            "maps_shape": list(self.maps.shape),
            "token_grid": list(self.token_maps.shape[1:]),
            "image_size": list(self.image.size),
        }
        return save_all_or_nothing(out, self.maps, self.raw_token_maps, {**info, **self.settings}, self._write)

    def _write(self, folder: Path, maps: torch.Tensor, raw: torch.Tensor | None, info: dict) -> dict[str, str]:
        """Every output file into ``folder``; returns ``{key: file name}``."""
        from ..viz import concept_grid, overlay_with_colorbar, segmentation

        names = {"image": "image.png", "maps": "maps.npy"}
        self.image.save(folder / names["image"])
        np.save(folder / names["maps"], maps.numpy().astype(np.float32))
        if raw is not None:
            names["maps_raw"] = "maps_raw.npy"
            np.save(folder / names["maps_raw"], raw.numpy().astype(np.float32))
        for k, (concept, name) in enumerate(zip(self.concepts, overlay_names(self.concepts))):
            names[f"overlay:{concept}"] = name
            overlay_with_colorbar(self.image, maps[k], concept).save(folder / name)
        names["grid"] = "grid.png"
        concept_grid(self.image, maps, self.concepts).save(folder / names["grid"])
        names["segmentation"] = "segmentation.png"
        segmentation(self.image, maps, self.concepts).save(folder / names["segmentation"])
        names["result"] = "result.json"
        info["files"] = dict(names)
        (folder / names["result"]).write_text(json.dumps(info, indent=2, allow_nan=False))
        return names


def save_all_or_nothing(
    out: Path | str, maps: torch.Tensor, raw: torch.Tensor | None, info: dict[str, Any], write: Any
) -> dict[str, Path]:
    """Check ``out``, the maps (finite) and ``info`` (JSON without NaN), then ``write(folder, maps, raw, info)``
    into a staged folder that takes ``out``'s place only when complete; returns ``{key: path}``."""
    out = check_out_dir(out)
    maps = maps.detach().float().cpu()
    raw = None if raw is None else raw.detach().float().cpu()
    if not bool(torch.isfinite(maps).all()) or (raw is not None and not bool(torch.isfinite(raw).all())):
        raise ConceptAttentionError(
            "the maps hold NaN or infinite values, so nothing was written: the model produced non-finite numbers "
            "(check the guidance and other settings; float16 can overflow, try --dtype bfloat16 or float32)"
        )
    info = {**info, "files": {}, "version": __version__}
    try:
        json.dumps(info, allow_nan=False)
    except ValueError:
        raise ConceptAttentionError(
            "a setting of this result is NaN or infinite, so nothing was written; give finite numbers"
        ) from None
    try:
        with _staged(out) as stage:
            names = write(stage, maps, raw, info)
    except OSError as err:
        raise ConceptAttentionError(
            f"could not write the results to {out}: {err.strerror or err}; free some disk space, or pass "
            "another --out that you can write to (nothing was left half-written)"
        ) from None
    return {key: out / name for key, name in names.items()}


#: The file that marks a folder as holding a result of :meth:`ConceptResult.save`.
RESULT_FILE = "result.json"


def check_out_dir(out: Path | str) -> Path:
    """``out`` as a Path if a result can be saved there, else one clear error; creates nothing.

    Allowed: a folder that does not exist yet (in a place that can be written), an empty folder, or
    a folder holding an earlier result (it has a ``result.json``; it is replaced whole). Call it
    before any computation, so a long run never ends on an unusable ``--out``.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConceptAttentionError(
            f"--out {out} is a file; give the path of a folder (new, empty, or an earlier result)"
        )
    if out.is_dir():
        entries = [p for p in out.iterdir()]
        if entries and not (out / RESULT_FILE).is_file():
            raise ConceptAttentionError(
                f"--out {out} already holds other files; give a new or empty folder (a folder holding an earlier "
                "result, with its result.json, is replaced whole)"
            )
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConceptAttentionError(f"cannot write into {parent}: permission denied; pass another --out")
    return out


@contextlib.contextmanager
def _staged(out: Path):
    """A fresh folder beside ``out`` to write into; on success it replaces ``out`` (an earlier result
    there is removed only after the new one is in place); on any error or interrupt it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old: Path | None = None
    try:
        yield stage
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # put the earlier result back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def upsample(token_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[K, h, w]`` -> ``[K, H, W]`` bilinear (per-pixel sums over concepts are kept)."""
    return F.interpolate(token_maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def result_from_session(
    image: Image.Image, session: Any, concepts: list[str], settings: dict[str, Any], batch_index: int | None
) -> ConceptResult:
    """Maps of one image from a finished ConceptAttention session.

    ``batch_index`` picks the batch item (e.g. -1: the conditional half of a guidance batch); None
    averages over the batch (noise samples of one image).
    """

    def pick(maps: torch.Tensor) -> torch.Tensor:  # [B, K, h, w] -> [K, h, w]
        return maps.mean(0) if batch_index is None else maps[batch_index]

    return result_from_maps(image, {name: pick(m) for name, m in session.all_maps().items()}, concepts, settings)


def result_from_maps(
    image: Image.Image, token_maps: dict[str, torch.Tensor], concepts: list[str], settings: dict[str, Any]
) -> ConceptResult:
    """A result from ``{readout: [K, h, w]}`` token maps; the first readout is the main one."""
    settings = with_readout_settings(settings)
    size = (image.size[1], image.size[0])
    all_maps = {name: m.float().cpu() for name, m in token_maps.items()}
    raw_names = [n for n in all_maps if n.endswith("/raw")]  # with_raw appends it last
    raw = all_maps.pop(raw_names[-1]) if raw_names else None
    first = next(iter(all_maps))
    main = all_maps.pop(first)
    return ConceptResult(
        image=image,
        maps=upsample(main, size),
        token_maps=main,
        concepts=concepts,
        settings=settings,
        extra_maps={k: upsample(v, size) for k, v in all_maps.items()},
        raw_token_maps=raw,
    )
