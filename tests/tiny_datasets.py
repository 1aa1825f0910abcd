"""Tiny benchmark files in the real formats, written by the tests: ImageNet-Segmentation's MATLAB v7.3
``gtsegs_ijcv.mat`` and a VOCdevkit tree with palette PNGs (imported by name, as :mod:`tiny_models`)."""

from __future__ import annotations

import h5py
import numpy as np
from PIL import Image


def write_gtsegs(path, images, masks, ids):
    """A MATLAB v7.3 gtsegs_ijcv.mat: /value/{img,gt,id} are (N, 1) object references; images stored
    [3, W, H], masks behind a second reference, ids as UTF-16 code units."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        ref = h5py.ref_dtype
        img_refs = value.create_dataset("img", (len(images), 1), dtype=ref)
        gt_refs = value.create_dataset("gt", (len(images), 1), dtype=ref)
        id_refs = value.create_dataset("id", (len(images), 1), dtype=ref)
        for i, (image, mask, image_id) in enumerate(zip(images, masks, ids)):
            d_img = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0))
            d_mask = refs.create_dataset(f"mask{i}", data=mask.transpose(1, 0))
            d_gt = refs.create_dataset(f"gt{i}", (1, 1), dtype=ref)
            d_gt[0, 0] = d_mask.ref
            d_id = refs.create_dataset(f"id{i}", data=np.array([[ord(c)] for c in image_id], dtype=np.uint16))
            img_refs[i, 0], gt_refs[i, 0], id_refs[i, 0] = d_img.ref, d_gt.ref, d_id.ref


def tiny_imagenet_seg(tmp_path, n=2, side=(40, 30)):
    rng = np.random.default_rng(0)
    h, w = side
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    masks = []
    for i in range(n):
        m = np.zeros((h, w), dtype=np.uint8)
        m[5 + i : 25, 4:20] = 1
        masks.append(m)
    ids = ["n02085620_1234", "n07745940_77"][:n]
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks, ids)
    return path, images, masks


def palette_png(path, label):
    im = Image.fromarray(label.astype(np.uint8), "P")
    palette = [0, 0, 0] + [(37 * i) % 256 for i in range(3, 768)]
    im.putpalette(palette)
    im.save(path)


def tiny_voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    labels = {}
    a = np.zeros((20, 30), np.uint8)
    a[4:12, 5:15] = 12  # dog
    a[3, :] = 255  # void border
    b = np.zeros((20, 30), np.uint8)
    b[2:8, 2:8], b[10:18, 12:25] = 8, 15  # cat and person
    c = np.zeros((20, 30), np.uint8)
    c[5:15, 5:25] = 1  # plane
    for name, lab in (("2007_000001", a), ("2007_000002", b), ("2007_000003", c)):
        palette_png(root / "SegmentationClass" / f"{name}.png", lab)
        Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        labels[name] = lab
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    return tmp_path / "VOCdevkit", labels
