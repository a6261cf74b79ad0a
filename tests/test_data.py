"""Data layouts, splits, skipped files and image modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.core.errors import ConfigError, DataError
from headstart.data.images import load_image, to_rgb
from headstart.data.layout import resolve_data, stratified_split
from headstart.data.loading import make_loader, ramp_batches

from conftest import make_class_tree, make_image


def test_train_val_layout(tiny_split):
    s = resolve_data(tiny_split)
    assert s.classes == ["green", "red"]
    assert (len(s.train), len(s.val)) == (24, 10)
    assert s.counts("val") == {"green": 5, "red": 5}
    assert s.layout == "train/ + val/"


def test_separate_val_folder(tmp_path):
    make_class_tree(tmp_path / "a", per_class=4)
    make_class_tree(tmp_path / "b", classes=("red",), per_class=2)
    s = resolve_data(tmp_path / "a", val=tmp_path / "b")
    assert len(s.train) == 8 and len(s.val) == 2
    assert {y for _, y in s.val} == {s.classes.index("red")}  # labels remapped by name


def test_single_tree_is_split_stratified_and_seeded(tiny_tree):
    a = resolve_data(tiny_tree, val_fraction=0.2, seed=1)
    b = resolve_data(tiny_tree, val_fraction=0.2, seed=1)
    c = resolve_data(tiny_tree, val_fraction=0.2, seed=2)
    assert a.val == b.val and a.val != c.val
    assert a.counts("val") == {"blue": 2, "green": 2, "red": 2}
    assert not set(a.train) & set(a.val)
    with pytest.raises(ConfigError):
        stratified_split(a.train, 1.5, 0)


def test_non_images_and_strays_are_listed_not_fatal(tiny_split):
    (tiny_split / "train" / "red" / "notes.txt").write_text("hello")
    (tiny_split / "train" / "red" / ".DS_Store").write_bytes(b"\0")
    (tiny_split / "train" / "empty").mkdir()
    s = resolve_data(tiny_split)
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ((k.path, k.reason) for k in s.skipped)}
    assert reasons["notes.txt"] == "not an image file extension"
    assert reasons[".DS_Store"] == "hidden or system file"
    assert "empty class folder" in reasons["empty"]
    assert s.classes == ["green", "red"]


def test_errors_name_the_problem(tmp_path, tiny_split):
    with pytest.raises(DataError, match="does not exist"):
        resolve_data(tmp_path / "missing")
    make_class_tree(tmp_path / "one", classes=("red",), per_class=3)
    with pytest.raises(DataError, match="at least 2"):
        resolve_data(tmp_path / "one")
    make_class_tree(tmp_path / "v", classes=("red", "blue"), per_class=2)
    with pytest.raises(DataError, match="blue"):
        resolve_data(tiny_split / "train", val=tmp_path / "v")


def test_modes_become_rgb(tmp_path):
    arr16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    p16 = tmp_path / "deep.png"
    Image.fromarray(arr16).save(p16)
    img = load_image(p16)
    assert img.mode == "RGB"
    v = np.asarray(img)[..., 0]
    assert v.max() > 200 and v.min() < 10 and len(np.unique(v)) > 100  # scaled, not saturated
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    make_image(tmp_path / "x.jpg", (10, 200, 10))
    # draft decodes at the smallest DCT scale that still covers the requested size
    assert load_image(tmp_path / "x.jpg", draft=16).size == (20, 20)
    assert load_image(tmp_path / "x.jpg", draft=30).size == (40, 40)


def test_ramp_batches_grow_to_the_batch_size_and_cover_every_index_once_in_order():
    batches = ramp_batches(200, 64)
    assert [len(b) for b in batches] == [8, 16, 32, 64, 64, 16]
    assert [i for b in batches for i in b] == list(range(200))
    assert ramp_batches(5, 64) == [[0, 1, 2, 3, 4]]
    assert ramp_batches(0, 64) == []
    assert [len(b) for b in ramp_batches(10, 4)] == [4, 4, 2]  # never above batch_size


def test_ramped_loader_serves_the_same_items_in_order():
    data = [(torch.full((1,), float(i)), 0, i, None) for i in range(100)]  # (x, label, index, error)
    loader = make_loader(data, batch_size=32, shuffle=False, num_workers=0, ramp=True)
    ramped = [b.index.tolist() for b in loader]
    assert [len(b) for b in ramped] == [8, 16, 32, 32, 12]
    assert sum(ramped, []) == list(range(100))
    plain = make_loader(data, batch_size=32, shuffle=False, num_workers=0)
    assert [len(b.index) for b in plain] == [32, 32, 32, 4]


@pytest.mark.parametrize(("side", "size"), [((500, 375), 224), ((32, 32), 192), ((41, 97), 128)])
def test_tensor_preprocessing_gives_pil_pixels_and_contiguous_batches(side, size):
    """The uint8-tensor resize (fast) against PIL's (what the models were first trained with):
    at most 2 of 255 apart, on under 3 % of the pixels; every output contiguous, in every form."""
    from torchvision import transforms as v1

    from headstart.data.transforms import Augment, Preprocess, eval_transform, train_transform

    pp = Preprocess(size, (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (side[1] // 8 + 1, side[0] // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(smooth).resize(side, Image.BILINEAR)  # photo-like: smooth, with edges
    pil = v1.Compose([v1.Resize(pp.resize_size, interpolation=v1.InterpolationMode.BICUBIC),
                      v1.CenterCrop(size), v1.PILToTensor()])(img)  # fmt: skip
    ours = eval_transform(pp, uint8=True)(img)
    assert ours.dtype == torch.uint8 and ours.shape == pil.shape == (3, size, size) and ours.is_contiguous()
    diff = (ours.int() - pil.int()).abs()
    assert int(diff.max()) <= 2 and float((diff > 0).float().mean()) < 0.03
    floats = eval_transform(pp)(img)
    assert floats.dtype == torch.float32 and -1 <= float(floats.min()) and float(floats.max()) <= 1
    torch.testing.assert_close(floats, ours.float() / 127.5 - 1, atol=1e-5, rtol=0)
    for aug in (Augment(), Augment(rotation=10, color_jitter=0.3, vflip=True)):
        x = train_transform(pp, aug, uint8=True)(img)
        assert x.dtype == torch.uint8 and x.shape == (3, size, size) and x.is_contiguous()
