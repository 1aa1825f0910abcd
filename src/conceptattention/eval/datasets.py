"""Benchmark datasets as lists of samples: an image, a caption, concepts and what is scored.

- ``shapes``: the held-out shapes world (seeded, generated on the fly, no files);
- ``imagenet-seg``: ImageNet-Segmentation, ``gtsegs_ijcv.mat`` (MATLAB v7.3 = HDF5);
- ``voc-single`` / ``voc-multi``: PascalVOC 2012 val in the VOCdevkit layout.

A sample says what to score: ``binary`` targets (one concept's map, thresholded, against a mask),
a ``multi`` target (argmax over some concepts' maps against a class map) and, for shapes, a
``pick`` target (which of two concepts wins at each object pixel).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConceptAttentionError

DATA_DIR = Path(__file__).resolve().parent / "data"

#: The paper's concepts besides the class name on ImageNet-Segmentation.
IMAGENET_EXTRA_CONCEPTS = ("background", "floor", "tree", "person", "grass", "face")
#: PascalVOC class names as one-word concepts (index = VOC class id; 0 is background).
VOC_CLASSES = (
    "background",
    "plane",
    "bike",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "table",
    "dog",
    "horse",
    "motorcycle",
    "person",
    "pot",
    "sheep",
    "sofa",
    "train",
    "monitor",
)
#: Concepts whose maps count as "background" in the multi-class argmax.
VOC_BACKGROUND_CONCEPTS = ("background", "floor", "tree", "grass", "sky")
VOID = 255


@dataclass
class BinaryTarget:
    """Score the map of ``concept`` (an index into the sample's concepts) against ``mask`` ``[H, W]``."""

    concept: int
    mask: torch.Tensor
    valid: torch.Tensor | None = None  # False = void, not scored


@dataclass
class MultiTarget:
    """Argmax over the maps of ``candidates`` (concept indices), each naming class ``classes[i]``,
    scored against ``label`` ``[H, W]`` (class ids, -1 = void)."""

    label: torch.Tensor
    candidates: list[int]
    classes: list[int]


@dataclass
class PickTarget:
    """At pixels where ``truth`` is 0 the map of ``concepts[0]`` should beat ``concepts[1]``; where 1,
    the reverse; -1 is not scored."""

    concepts: tuple[int, int]
    truth: torch.Tensor


@dataclass
class Sample:
    key: str
    image: Any  # PIL image, or a [3, H, W] tensor in [0, 1]
    caption: str
    concepts: list[str]
    binary: list[BinaryTarget] = field(default_factory=list)
    multi: MultiTarget | None = None
    pick: PickTarget | None = None  # which of two shape words (the shapes world)
    color_pick: PickTarget | None = None  # which of two colour words (the shapes world)


class Dataset:
    """A fixed, ordered list of samples; ``settings`` are the protocol defaults for this dataset."""

    name: str = ""
    class_names: tuple[str, ...] = ()
    #: protocol defaults: label side (None: keep), upsampling of maps to labels, blur of token maps
    settings: dict[str, Any] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "images": len(self)}


def _resize_label(label: np.ndarray, size: int | None) -> torch.Tensor:
    if size is None:
        return torch.from_numpy(label.astype(np.int64))
    resized = Image.fromarray(label.astype(np.uint8)).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(resized).astype(np.int64))


# ----- shapes ------------------------------------------------------------------------------------------
class ShapesDataset(Dataset):
    """The held-out shapes world: ``n`` images from a fixed seed (never trained on)."""

    name = "shapes"
    class_names = ("background", "circle", "square", "triangle")
    settings = {"label_size": None, "upsample": "bilinear", "blur": 0.0}

    def __init__(self, n: int = 500, seed: int | None = None) -> None:
        from ..shapes import world

        if n < 1:
            raise ConceptAttentionError("the shapes benchmark needs at least one image")
        self.seed = world.HELDOUT_SEED if seed is None else seed
        self.n, self.concepts = n, list(world.CONCEPTS)
        self.scenes = world.sample_scenes(n, self.seed)
        self.images, self.labels = world.render(self.scenes)
        self.captions = world.captions(self.scenes)
        self.word_masks = {w: world.concept_mask(self.scenes, self.labels, w) for w in self.concepts}
        self.shapes, self.backgrounds = tuple(world.SHAPES), tuple(world.BACKGROUNDS)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "images": self.n, "seed": self.seed}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.n:
            raise IndexError(index)
        caption, concepts = self.captions[index], self.concepts
        words = set(caption.split()) | {"background"}
        binary = [BinaryTarget(k, self.word_masks[w][index]) for k, w in enumerate(concepts) if w in words]
        objects = self.scenes.objects(index)
        label = torch.zeros(self.labels[index].shape, dtype=torch.long)
        for slot, (_, shape) in enumerate(objects, start=1):  # label map slot 1 = first present object
            label[self.labels[index] == slot] = 1 + self.shapes.index(shape)
        present = sorted({shape for _, shape in objects}, key=self.shapes.index)
        background_words = [w for w in ("background", *self.backgrounds) if w in words]
        candidates = [concepts.index(w) for w in background_words] + [concepts.index(s) for s in present]
        classes = [0] * len(background_words) + [1 + self.shapes.index(s) for s in present]
        picks = [None, None]  # (shape, colour): at the pixels of two objects that differ in it
        if len(objects) == 2:
            truth = torch.full(label.shape, -1, dtype=torch.long)
            truth[self.labels[index] == 1] = 0
            truth[self.labels[index] == 2] = 1
            for k, part in ((0, 1), (1, 0)):  # objects are (colour, shape)
                if objects[0][part] != objects[1][part]:
                    picks[k] = PickTarget((concepts.index(objects[0][part]), concepts.index(objects[1][part])), truth)
        return Sample(
            f"shapes-{self.seed}-{index}",
            self.images[index],
            caption,
            list(concepts),
            binary,
            MultiTarget(label, candidates, classes),
            pick=picks[0],
            color_pick=picks[1],
        )


# ----- ImageNet-Segmentation ----------------------------------------------------------------------------
IMAGENET_LAYOUT = (
    "ImageNet-Segmentation is one MATLAB v7.3 (HDF5) file, gtsegs_ijcv.mat (4,276 images), from the "
    "'ImageNet auto-annotation' release of Guillaumin, Kuettel and Ferrari (also mirrored by the "
    "Transformer-Explainability project of Chefer et al.). It must hold /value/img, /value/gt and /value/id, "
    "each an (N, 1) array of object references."
)


@lru_cache(maxsize=1)
def wordnet_lemmas() -> dict[str, str]:
    """WordNet noun id (``n02085620``) -> first lemma (``Chihuahua``), for the ImageNet-21k synsets.

    Vendored from the synset/lemma table that timm ships (timm/data/_info/imagenet_synset_to_lemma.txt).
    """
    table: dict[str, str] = {}
    with gzip.open(DATA_DIR / "imagenet_synset_lemmas.tsv.gz", "rt", encoding="utf-8") as f:
        for line in f:
            wnid, _, lemmas = line.rstrip("\n").partition("\t")
            table[wnid] = lemmas.split(",")[0].strip()
    return table


def imagenet_concept(wnid: str, class_map: dict[str, str] | None = None) -> str:
    """The concept word for a WordNet id: the class map's entry (by id or by lemma), else the lemma."""
    lemma = wordnet_lemmas().get(wnid)
    if class_map:
        for key in (wnid, lemma):
            if key is not None and key in class_map:
                return class_map[key]
    if lemma is None:
        raise ConceptAttentionError(
            f"WordNet id {wnid} is not in the vendored ImageNet-21k table; pass --class-map FILE.json "
            f'with an entry such as {{"{wnid}": "dog"}}'
        )
    return lemma.replace("_", " ")


def load_class_map(path: str | Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConceptAttentionError(f"cannot read the class map {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConceptAttentionError(
            f"the class map {path} must be a JSON object of strings: WordNet id or lemma -> concept word"
        )
    return data


class ImageNetSegDataset(Dataset):
    """ImageNet-Segmentation: concepts = [class, background, floor, tree, person, grass, face],
    caption "a {class}"; labels resized to 224 (nearest); maps nearest-upsampled (the paper's protocol)."""

    name = "imagenet-seg"
    settings = {"label_size": 224, "upsample": "nearest", "blur": 1.0}

    def __init__(self, path: str | Path, class_map: str | Path | dict | None = None) -> None:
        try:
            import h5py
        except ImportError:
            raise ConceptAttentionError("reading gtsegs_ijcv.mat needs h5py: pip install h5py") from None
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "gtsegs_ijcv.mat"
        if not self.path.is_file():
            raise ConceptAttentionError(f"no ImageNet-Segmentation file at {self.path}. {IMAGENET_LAYOUT}")
        self.class_map = class_map if isinstance(class_map, dict) or class_map is None else load_class_map(class_map)
        try:
            self._file = h5py.File(self.path, "r")
            value = self._file["value"]
            self._img, self._gt, self._id = value["img"], value["gt"], value["id"]
            self.n = int(self._img.shape[0])
        except (OSError, KeyError) as e:
            raise ConceptAttentionError(
                f"{self.path} is not a readable ImageNet-Segmentation file ({e}). {IMAGENET_LAYOUT}"
            ) from None
        if not (self._gt.shape[0] == self._id.shape[0] == self.n):
            raise ConceptAttentionError(f"{self.path}: /value/img, /value/gt and /value/id differ in length")

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "images": self.n,
            "file": str(self.path),
            "class_map": "given" if self.class_map else "WordNet lemmas",
        }

    def image_id(self, index: int) -> str:
        chars = np.asarray(self._file[self._id[index, 0]]).flatten()
        return "".join(chr(int(c)) for c in chars)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.n:
            raise IndexError(index)
        f = self._file
        try:
            pixels = np.asarray(f[self._img[index, 0]]).transpose(2, 1, 0)  # stored [3, W, H]
            gt_ref = np.asarray(f[self._gt[index, 0]]).flatten()[0]
            mask = np.asarray(f[gt_ref]).transpose(1, 0)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise ConceptAttentionError(f"{self.path}: entry {index} is malformed ({e}). {IMAGENET_LAYOUT}") from None
        image_id = self.image_id(index)
        name = imagenet_concept(image_id.split("_")[0], self.class_map)
        concepts = [name] + [c for c in IMAGENET_EXTRA_CONCEPTS if c != name]
        label = _resize_label((mask > 0).astype(np.uint8), self.settings["label_size"]).bool()
        image = Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)), "RGB")
        return Sample(image_id, image, f"a {name}", concepts, [BinaryTarget(0, label)])


# ----- PascalVOC ---------------------------------------------------------------------------------------
VOC_LAYOUT = (
    "PascalVOC 2012 comes from the VOCtrainval_11-May-2012 archive of host.robots.ox.ac.uk/pascal/VOC/voc2012; "
    "pass its VOCdevkit (or VOCdevkit/VOC2012) folder, which must hold JPEGImages/<id>.jpg, "
    "SegmentationClass/<id>.png (palette PNG, 255 = void) and ImageSets/Segmentation/val.txt."
)


class VOCDataset(Dataset):
    """PascalVOC 2012 val. ``single``: images with background plus exactly one class (binary task on
    that class, concepts = [class, background, floor, tree, person, grass, face] minus repeats);
    ``multi``: every val image, argmax over the background concepts and the present classes."""

    class_names = VOC_CLASSES
    settings = {"label_size": 224, "upsample": "nearest", "blur": 1.0}

    def __init__(self, root: str | Path, split: str = "single") -> None:
        if split not in ("single", "multi"):
            raise ConceptAttentionError(f"VOC split is 'single' or 'multi', not {split!r}")
        root = Path(root)
        if (root / "VOC2012").is_dir():
            root = root / "VOC2012"
        ids_file = root / "ImageSets" / "Segmentation" / "val.txt"
        if not ids_file.is_file() or not (root / "SegmentationClass").is_dir() or not (root / "JPEGImages").is_dir():
            raise ConceptAttentionError(f"no PascalVOC 2012 tree at {root}. {VOC_LAYOUT}")
        self.root, self.split, self.name = root, split, f"voc-{split}"
        ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        self.items: list[tuple[str, list[int]]] = []
        for image_id in ids:
            classes = sorted(int(c) for c in np.unique(self._label(image_id)) if c not in (0, VOID))
            if split == "multi" or len(classes) == 1:
                self.items.append((image_id, classes))

    def _label(self, image_id: str) -> np.ndarray:
        path = self.root / "SegmentationClass" / f"{image_id}.png"
        try:
            with Image.open(path) as im:
                if im.mode != "P":
                    raise ConceptAttentionError(f"{path} is not a palette PNG (mode {im.mode}). {VOC_LAYOUT}")
                label = np.asarray(im)
        except OSError as e:
            raise ConceptAttentionError(f"cannot read {path}: {e}. {VOC_LAYOUT}") from None
        bad = set(np.unique(label).tolist()) - set(range(len(VOC_CLASSES))) - {VOID}
        if bad:
            raise ConceptAttentionError(f"{path} has class ids {sorted(bad)} outside 0-20 and 255. {VOC_LAYOUT}")
        return label

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "images": len(self), "root": str(self.root)}

    def __getitem__(self, index: int) -> Sample:
        image_id, classes = self.items[index]
        path = self.root / "JPEGImages" / f"{image_id}.jpg"
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as e:
            raise ConceptAttentionError(f"cannot read {path}: {e}. {VOC_LAYOUT}") from None
        label = _resize_label(self._label(image_id), self.settings["label_size"])
        valid = label != VOID
        names = [VOC_CLASSES[c] for c in classes]
        caption = "a " + " and a ".join(names) if names else "a photo"
        if self.split == "single":
            name = names[0]
            concepts = [name] + [c for c in IMAGENET_EXTRA_CONCEPTS if c != name]
            return Sample(image_id, image, caption, concepts, [BinaryTarget(0, label == classes[0], valid)])
        concepts = list(VOC_BACKGROUND_CONCEPTS) + [n for n in names if n not in VOC_BACKGROUND_CONCEPTS]
        candidates = list(range(len(concepts)))
        ids = [0] * len(VOC_BACKGROUND_CONCEPTS) + [
            VOC_CLASSES.index(c) for c in concepts[len(VOC_BACKGROUND_CONCEPTS) :]
        ]
        target = torch.where(valid, label, torch.full_like(label, -1))
        return Sample(image_id, image, caption, concepts, multi=MultiTarget(target, candidates, ids))


DATASETS: tuple[str, ...] = ("shapes", "imagenet-seg", "voc-single", "voc-multi")


def load_dataset(
    name: str, path: str | Path | None = None, *, images: int = 500, class_map: str | Path | None = None
) -> Dataset:
    """A dataset by name; real datasets read ``path`` (the file or folder the error messages describe)."""
    if name == "shapes":
        return ShapesDataset(images)
    if name not in DATASETS:
        raise ConceptAttentionError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if path is None:
        layout = IMAGENET_LAYOUT if name == "imagenet-seg" else VOC_LAYOUT
        raise ConceptAttentionError(f"--data PATH is needed for {name}. {layout}")
    if name == "imagenet-seg":
        return ImageNetSegDataset(path, class_map)
    return VOCDataset(path, "single" if name == "voc-single" else "multi")


def subset(dataset: Dataset, limit: int | None) -> Sequence[int]:
    """The indices evaluated: the first ``limit`` (all when None)."""
    n = len(dataset)
    return range(n if limit is None else max(0, min(n, limit)))
