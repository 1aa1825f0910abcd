"""The benchmark loaders (eval/datasets.py) on tiny files in the real formats: ImageNet-Seg's v7.3 ``.mat``
(object references, UTF-16 ids) and a VOCdevkit tree with palette PNGs and void pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_datasets import tiny_imagenet_seg, tiny_voc, write_gtsegs

from conceptattention.errors import ConceptAttentionError
from conceptattention.eval.datasets import ImageNetSegDataset, VOCDataset, load_dataset


def test_imagenet_seg_reads_the_v73_layout(tmp_path):
    path, images, masks = tiny_imagenet_seg(tmp_path)
    ds = ImageNetSegDataset(path)
    assert len(ds) == 2
    s = ds[0]
    assert s.key == "n02085620_1234" and s.concepts[0] == "Chihuahua" and s.caption == "a Chihuahua"
    assert s.concepts[1:] == ["background", "floor", "tree", "person", "grass", "face"]
    assert np.array_equal(np.asarray(s.image), images[0])  # H x W x 3, orientation kept
    label = np.asarray(Image.fromarray(masks[0]).resize((224, 224), Image.NEAREST)).astype(bool)
    assert torch.equal(s.binary[0].mask, torch.from_numpy(label))
    assert ds[1].concepts[0] == "strawberry"
    mapped = ImageNetSegDataset(tmp_path, class_map={"n02085620": "dog"})  # a folder holding the file works too
    assert mapped[0].concepts[0] == "dog" and mapped[0].caption == "a dog"


def test_imagenet_seg_errors(tmp_path):
    with pytest.raises(ConceptAttentionError, match="gtsegs_ijcv.mat"):
        ImageNetSegDataset(tmp_path / "missing.mat")
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(ConceptAttentionError, match="not a readable ImageNet-Segmentation file"):
        ImageNetSegDataset(bad)
    odd = tmp_path / "odd.mat"
    write_gtsegs(odd, [np.zeros((4, 4, 3), np.uint8)], [np.zeros((4, 4), np.uint8)], ["n99999999_1"])
    with pytest.raises(ConceptAttentionError, match="--class-map"):
        ImageNetSegDataset(odd)[0]
    cmap = tmp_path / "map.json"
    cmap.write_text("[1, 2]")
    with pytest.raises(ConceptAttentionError, match="JSON object"):
        load_dataset("imagenet-seg", odd, class_map=cmap)
    with pytest.raises(ConceptAttentionError, match="--data PATH"):
        load_dataset("voc-single")


def test_voc_single_and_multi_splits(tmp_path):
    root, labels = tiny_voc(tmp_path)
    single = VOCDataset(root, "single")
    assert [s.key for s in (single[0], single[1])] == ["2007_000001", "2007_000003"] and len(single) == 2
    s = single[0]
    assert s.concepts[0] == "dog" and s.caption == "a dog"
    t = s.binary[0]
    big = np.asarray(Image.fromarray(labels["2007_000001"]).resize((224, 224), Image.NEAREST))
    assert torch.equal(t.mask, torch.from_numpy(big == 12)) and torch.equal(t.valid, torch.from_numpy(big != 255))
    assert (~t.valid).sum() > 0
    multi = VOCDataset(root / "VOC2012", "multi")
    assert len(multi) == 3
    m = multi[1]
    assert m.caption == "a cat and a person" and m.concepts[-2:] == ["cat", "person"]
    assert m.multi.classes == [0, 0, 0, 0, 0, 8, 15]
    assert set(torch.unique(multi[0].multi.label).tolist()) == {-1, 0, 12}


def test_voc_errors(tmp_path):
    with pytest.raises(ConceptAttentionError, match="VOCdevkit"):
        VOCDataset(tmp_path)
    root, _ = tiny_voc(tmp_path)
    rgb = root / "VOC2012" / "SegmentationClass" / "2007_000002.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(rgb)
    with pytest.raises(ConceptAttentionError, match="not a palette PNG"):
        VOCDataset(root, "multi")
