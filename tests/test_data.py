"""Tests of bnnconvert.data on the bundled real data and on small files written here."""

from __future__ import annotations

import configparser
import re
import sys
from itertools import chain
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bnnconvert import data, datasets

DEMO = Path(data.__file__).resolve().parent / "demo_data"


def stack(dataset, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or some) items of a dataset as two stacked tensors."""
    indices = range(len(dataset)) if indices is None else indices
    xs, ys = zip(*(dataset[i] for i in indices))
    return torch.stack(xs), torch.stack(ys)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- demo digits


@pytest.fixture(scope="module")
def raw_digits() -> dict[str, np.ndarray]:
    with np.load(DEMO / "digits.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize(("split", "n"), [("train", 4000), ("val", 500), ("test", 500)])
def test_demo_classification_split_sizes_shapes_and_labels(split, n):
    ds = data.demo_classification(split)
    x, y = stack(ds)
    assert len(ds) == n and x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert ds.task == "multiclass" and ds.num_classes == 10 and ds.in_channels == 1
    # stratified split of 500 digits per class: 80 / 10 / 10 % of each class
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10


def test_demo_digits_have_mnist_statistics():
    # the published MNIST normalisation constants (mean 0.1307, std 0.3081 on [0, 1])
    x, _ = stack(data.demo_classification("train", normalize=False))
    assert x.min() == 0.0 and x.max() == 1.0
    assert abs(x.mean().item() - 0.1307) < 0.005
    assert abs(x.std().item() - 0.3081) < 0.005


def test_demo_digit_splits_do_not_overlap(raw_digits):
    seen = {s: {im.tobytes() for im in raw_digits[f"{s}_images"]} for s in datasets.SPLITS}
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


def test_normalisation_is_the_papers(raw_digits):
    ds = data.demo_classification("val")
    raw = raw_digits["val_images"][:50].astype(np.float64)
    expected = (raw / 255.0 - 0.5) / 0.5
    x, y = stack(ds, range(50))
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-6)
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.tolist() == raw_digits["val_labels"][:50, 0].tolist()
    unnormalised, _ = data.demo_classification("val", normalize=False)[0]
    np.testing.assert_allclose(unnormalised[0].numpy(), raw[0] / 255.0, atol=1e-6)


def test_as_rgb_repeats_grey():
    grey, _ = data.demo_classification("test")[3]
    rgb, _ = data.demo_classification("test", as_rgb=True)[3]
    assert rgb.shape == (3, 28, 28)
    assert data.demo_classification("test", as_rgb=True).in_channels == 3
    for c in range(3):
        assert torch.equal(rgb[c], grey[0])


@pytest.mark.parametrize("size", [14, 20, 56])
def test_resize_matches_pillow_bilinear(raw_digits, size):
    ds = data.demo_classification("test", size=size, normalize=False)
    for i in range(5):
        pil = Image.fromarray(raw_digits["test_images"][i]).resize((size, size), Image.BILINEAR)
        x, _ = ds[i]
        assert x.shape == (1, size, size)
        # Pillow rounds to uint8, hence the tolerance of one grey level
        np.testing.assert_allclose(x[0].numpy(), np.asarray(pil) / 255.0, atol=1.01 / 255)


def test_demo_ood_is_real_non_digit_patches():
    ds = data.demo_ood(normalize=False)
    x, source = stack(ds)
    assert x.shape == (500, 1, 28, 28) and len(ds) == 500
    assert ds.num_classes == 15 and set(source.tolist()) == set(range(15))
    with np.load(DEMO / "ood_patches.npz", allow_pickle=False) as npz:
        assert len(npz["label_names"]) == 15
    # unlike the digits (mostly black background), the patches are textured photographs
    digits, _ = stack(data.demo_classification("test", normalize=False))
    assert (x == 0).float().mean() < 0.1 < (digits == 0).float().mean()
    assert (x.flatten(1).std(1) * 255 >= 7.9).all()


# ----------------------------------------------------------------------------- npz written here


def test_rgb_npz_keeps_channel_order_and_converts_to_grey(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 9, 9, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "rgb.npz", test_images=images, test_labels=np.zeros((6, 1)))
    ds = data.medmnist_npz(path, "test", normalize=False)
    assert ds.in_channels == 3
    x, _ = ds[2]
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), images[2] / 255.0, atol=1e-6)
    grey, _ = data.medmnist_npz(path, "test", as_rgb=False, normalize=False)[2]
    pil = np.asarray(Image.fromarray(images[2]).convert("L")) / 255.0
    assert grey.shape == (1, 9, 9)
    np.testing.assert_allclose(grey[0].numpy(), pil, atol=1.01 / 255)


def test_multilabel_npz_labels_and_pos_weight(tmp_path):
    labels = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    path = write_npz(tmp_path / "chest.npz", train_images=images, train_labels=labels)
    ds = data.medmnist_npz(path)
    assert ds.task == "multilabel" and ds.num_classes == 4
    _, y = ds[1]
    assert y.dtype == torch.float32 and y.tolist() == [0.0, 1.0, 1.0, 0.0]
    # positives per label 1, 2, 3, 0 of 4 rows: neg / pos = 3, 1, 1/3, and 1.0 when absent
    with pytest.warns(UserWarning, match=r"labels \[3\] never occur"):
        weights = ds.class_weights()
    np.testing.assert_allclose(weights.numpy(), [3.0, 1.0, 1.0 / 3.0, 1.0], rtol=1e-6)


def test_multiclass_class_weights_by_hand(tmp_path):
    train = np.array([0, 0, 0, 1, 2, 2])[:, None]
    path = write_npz(
        tmp_path / "m.npz",
        train_images=np.zeros((6, 28, 28), np.uint8),
        train_labels=train,
        val_images=np.zeros((1, 28, 28), np.uint8),
        val_labels=np.array([[3]]),
    )
    ds = data.medmnist_npz(path)
    assert ds.num_classes == 4  # class 3 occurs only in val
    # N / (K * n_c) with N = 6, K = 4, n = 3, 1, 2, 0
    with pytest.warns(UserWarning, match=r"classes \[3\] never occur"):
        weights = ds.class_weights()
    np.testing.assert_allclose(weights.numpy(), [0.5, 1.5, 0.75, 1.0], rtol=1e-6)
    assert data.demo_classification("train").class_weights().tolist() == [1.0] * 10


# ----------------------------------------------------------------------------- demo nuclei


NUCLEI_COUNTS = {"train": 135, "val": 15, "test": 16}


@pytest.mark.parametrize(("split", "n"), NUCLEI_COUNTS.items())
def test_demo_segmentation_shapes_and_masks(split, n):
    ds = data.demo_segmentation(split)
    x, y = stack(ds)
    assert len(ds) == n and x.shape == (n, 1, 64, 64) and x.dtype == torch.float32
    assert y.shape == (n, 64, 64) and y.dtype == torch.int64
    assert ds.task == "segmentation" and ds.num_classes == 2 and ds.in_channels == 1
    assert ds.raters == () and -1.0 <= x.min() < x.max() <= 1.0
    assert set(y.unique().tolist()) == {0, 1}
    assert 0.1 < y.float().mean() < 0.35  # nuclei cover about a fifth of the image
    for name in ds.ids:  # every mask file is binary, and read back as 0/1
        png = np.asarray(Image.open(DEMO / "nuclei" / split / "masks" / f"{name}.png"))
        assert set(np.unique(png).tolist()) <= {0, 255}
    first = np.asarray(Image.open(DEMO / "nuclei" / split / "masks" / f"{ds.ids[0]}.png"))
    np.testing.assert_array_equal(y[0].numpy(), first // 255)


def tile_origins(ds) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in re.fullmatch(r"r(\d+)_c(\d+)", i).groups()) for i in ds.ids]


def tile_rectangles(split: str) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right), bottom and right exclusive, of each tile of a split."""
    return [(r, c, r + 64, c + 64) for r, c in tile_origins(data.demo_segmentation(split))]


def intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_demo_segmentation_splits_share_no_pixel():
    rects = {split: tile_rectangles(split) for split in NUCLEI_COUNTS}
    for one, other in [("train", "val"), ("train", "test"), ("val", "test")]:
        shared = [(a, b) for a in rects[one] for b in rects[other] if intersect(a, b)]
        assert not shared, f"{one} and {other} tiles overlap: {shared[:3]}"
    # the same by pixel count: the column bands, and the splits together cover the image
    cover = {}
    for split, tiles in rects.items():
        cover[split] = np.zeros((512, 512), dtype=np.int64)
        for top, left, bottom, right in tiles:
            assert 0 <= top < bottom <= 512 and 0 <= left < right <= 512
            cover[split][top:bottom, left:right] += 1
    bands = {"train": (0, 320), "val": (320, 384), "test": (384, 512)}
    for split, (start, end) in bands.items():
        inside = cover[split][:, start:end]
        assert inside.min() >= 1 and cover[split].sum() == inside.sum(), split
    assert (cover["test"][:, 384:] == 1).all()  # test tiles tile their band exactly once
    assert ((cover["train"] > 0) + (cover["val"] > 0) + (cover["test"] > 0) == 1).all()


def test_demo_segmentation_ids_are_true_positions():
    # overlapping tiles must agree on their shared pixels if the ids are positions
    canvas = np.full((512, 512), -1.0)
    label = np.full((512, 512), -1)
    for split in NUCLEI_COUNTS:
        ds = data.demo_segmentation(split, normalize=False)
        for i, (r, c) in enumerate(tile_origins(ds)):
            x, y = ds[i]
            window = (slice(r, r + 64), slice(c, c + 64))
            seen = canvas[window] >= 0
            np.testing.assert_array_equal(canvas[window][seen], x[0].numpy()[seen])
            np.testing.assert_array_equal(label[window][seen], y.numpy()[seen])
            canvas[window], label[window] = x[0].numpy(), y.numpy()
    assert (canvas >= 0).all()


def test_open_data_reads_the_nuclei_val_split():
    loader = data.open_data("demo:nuclei", "val", batch_size=15)
    x, y = next(iter(loader))
    assert x.shape == (15, 1, 64, 64) and y.shape == (15, 64, 64)
    assert torch.equal(y[0], data.demo_segmentation("val")[0][1])


def test_package_data_ships_every_demo_file():
    # setup.cfg's package_data globs must match each bundled file, the new split's too
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    globs = config["options.package_data"]["bnnconvert"].split()
    files = [PurePosixPath(p.relative_to(DEMO.parent).as_posix()) for p in DEMO.rglob("*")]
    files = [f for f in files if (DEMO.parent / f).is_file()]
    assert sum(f.parts[:3] == ("demo_data", "nuclei", "val") for f in files) == 30
    assert [f for f in files if not any(f.match(g) for g in globs)] == []


def test_segmentation_resize_uses_nearest_masks():
    full, small = data.demo_segmentation("test"), data.demo_segmentation("test", size=32)
    x, y = small[5]
    _, y_full = full[5]
    assert x.shape == (1, 32, 32) and y.dtype == torch.int64
    torch.testing.assert_close(y, y_full[1::2, 1::2])  # pixel centres of a 2x reduction


# ----------------------------------------------------------------------------- folders written here


def test_segmentation_folder_formats_and_multiclass(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    write_png(tmp_path / "images" / "a.png", grey)
    write_png(tmp_path / "masks" / "a.png", np.where(grey > 127, 255, 0).astype(np.uint8))
    tifffile.imwrite(tmp_path / "images" / "b.tif", grey)
    tifffile.imwrite(tmp_path / "masks" / "b.tif", (grey > 200).astype(np.uint8))
    np.save(tmp_path / "images" / "c.npy", grey)
    multiclass = (grey // 64).astype(np.uint8)  # labels 0..3
    np.save(tmp_path / "masks" / "c.npy", multiclass)
    (tmp_path / "images" / "LICENSE.txt").write_text("ignored")
    ds = data.segmentation_folder(tmp_path, normalize=False)
    assert ds.ids == ["a", "b", "c"] and ds.num_classes == 4
    for i, expected in enumerate([grey > 127, grey > 200, multiclass]):
        x, y = ds[i]
        np.testing.assert_allclose(x[0].numpy(), grey / 255.0, atol=1e-6)
        np.testing.assert_array_equal(y.numpy(), expected.astype(np.int64))
    counts = np.bincount((grey > 127).ravel(), minlength=4) + np.bincount(
        (grey > 200).ravel(), minlength=4
    )
    counts += np.bincount(multiclass.ravel(), minlength=4)
    np.testing.assert_allclose(ds.class_weights().numpy(), counts.sum() / (4 * counts), rtol=1e-6)


def test_segmentation_folder_rgb_split_and_mask_suffix(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "test" / "images" / "ISIC_0000001.png", rgb)
    write_png(
        tmp_path / "test" / "masks" / "ISIC_0000001_segmentation.png", np.zeros((6, 7), np.uint8)
    )
    ds = data.segmentation_folder(tmp_path, "test", mask_suffix="_segmentation", normalize=False)
    x, y = ds[0]
    assert ds.ids == ["ISIC_0000001"] and ds.in_channels == 3 and y.shape == (6, 7)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), rgb / 255.0, atol=1e-6)


@pytest.fixture
def three_raters(tmp_path) -> Path:
    write_png(tmp_path / "images" / "lesion.png", np.zeros((4, 4), np.uint8))
    half = np.zeros((4, 4), np.uint8)
    half[:, :2] = 1
    for rater, mask in {"r0": np.zeros((4, 4)), "r1": half, "r2": np.ones((4, 4))}.items():
        write_png(tmp_path / "masks" / rater / "lesion.png", mask.astype(np.uint8))
    return tmp_path


def rater_draws(ds, seed: int, n: int = 30) -> list[int]:
    torch.manual_seed(seed)
    return [int(ds[0][1].sum()) // 8 for _ in range(n)]  # mask sum 0, 8, 16 -> rater 0, 1, 2


def test_rater_sampling_is_seeded_and_random(three_raters):
    ds = data.segmentation_folder(three_raters)
    assert ds.raters == ("r0", "r1", "r2")
    first = rater_draws(ds, 0)
    assert rater_draws(ds, 0) == first
    assert rater_draws(ds, 1) != first
    assert set(first) == {0, 1, 2}
    masks = ds.all_masks(0)
    assert masks.shape == (3, 4, 4) and masks.dtype == torch.int64
    assert masks.sum(dim=(1, 2)).tolist() == [0, 8, 16]


def test_make_loader_same_seed_same_batches():
    ds = data.demo_classification("val")

    def labels(seed: int, shuffle: bool = True) -> list[list[int]]:
        loader = data.make_loader(ds, 100, shuffle=shuffle, seed=seed)
        return [y.tolist() for _, y in loader]

    torch.manual_seed(123)
    first = labels(7)
    torch.manual_seed(456)  # the global RNG does not matter
    assert labels(7) == first
    assert labels(8) != first
    in_order = ds.labels[:, 0].tolist()
    assert list(chain.from_iterable(first)) != in_order
    assert list(chain.from_iterable(labels(0, shuffle=False))) == in_order


# ----------------------------------------------------------------------------- bad input


def test_missing_npz(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MedMNIST file"):
        data.medmnist_npz(tmp_path / "chestmnist.npz")


def test_npz_missing_key(tmp_path):
    path = write_npz(tmp_path / "a.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="no array 'train_labels'"):
        data.medmnist_npz(path)
    with pytest.raises(ValueError, match="no array 'val_images'"):
        data.medmnist_npz(path, "val")


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data.demo_classification("validation")
    with pytest.raises(ValueError, match="has 'train', 'val', 'test'"):
        data.demo_segmentation("validation")


def test_not_an_npz(tmp_path):
    text = tmp_path / "labels.npz"
    text.write_text("this is not an archive\n")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        data.medmnist_npz(text)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        data.medmnist_npz(single)


def test_bad_npz_contents(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    path = write_npz(tmp_path / "a.npz", train_images=images, train_labels=np.array([[0, 2]] * 3))
    with pytest.raises(ValueError, match="values other than 0/1"):
        data.medmnist_npz(path)
    path = write_npz(tmp_path / "b.npz", train_images=images, train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"expected \(3, 1\)"):
        data.medmnist_npz(path)


def test_folder_without_masks(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="no masks/ folder"):
        data.segmentation_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no split folder .*\['images'\]"):
        data.segmentation_folder(tmp_path, "train")


def test_image_mask_id_mismatch(tmp_path):
    for name in ("a", "b"):
        write_png(tmp_path / "images" / f"{name}.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "masks" / "c.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"without a mask \['b'\].*without an image \['c'\]"):
        data.segmentation_folder(tmp_path)


def test_rater_missing_a_mask(three_raters):
    (three_raters / "masks" / "r1" / "lesion.png").unlink()
    with pytest.raises(ValueError, match=r"r1 do not match: images without a mask \['lesion'\]"):
        data.segmentation_folder(three_raters)
    write_png(three_raters / "masks" / "lesion.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="mixes mask files and rater subfolders"):
        data.segmentation_folder(three_raters)


def test_image_mask_size_mismatch(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((5, 4), np.uint8))
    ds = data.segmentation_folder(tmp_path)
    with pytest.raises(ValueError, match=r"is \(4, 4\) but its mask .* is \(5, 4\)"):
        ds[0]


def test_rgb_mask_is_rejected(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="single-channel"):
        data.segmentation_folder(tmp_path)[0]


def test_tiff_without_tifffile(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(ImportError, match="pip install tifffile"):
        datasets._read_array(tmp_path / "a.tif", mask=False)
