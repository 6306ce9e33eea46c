"""The datasets of the two file layouts: MedMNIST ``.npz`` files and image + mask folders.

Every dataset yields ``(image, target)`` with ``image`` a float32 tensor ``(C, H, W)``. With
``normalize=True`` (the default) intensities follow the paper: scaled to [0, 1], then
``(x - 0.5) / 0.5``, so they lie in [-1, 1].

- :func:`medmnist_npz`: classification, target int64 scalar (multi-class) or float32 ``(L,)``
  (multi-label, e.g. ChestMNIST).
- :func:`segmentation_folder`: segmentation, target int64 ``(H, W)``; one or several raters.

:mod:`bnnconvert.data` re-exports them, with the bundled data, data specs and loaders.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "MedMNISTDataset",
    "SegmentationFolderDataset",
    "medmnist_npz",
    "segmentation_folder",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601, as PIL's "L"
_MEDMNIST_KEYS = ", ".join(f"{s}_images, {s}_labels" for s in SPLITS)

# ----------------------------------------------------------------------------- shared helpers


def _to_float(array: np.ndarray) -> torch.Tensor:
    """Image array ``(H, W)`` or ``(H, W, C)`` -> float32 tensor ``(C, H, W)`` in [0, 1].

    Unsigned integers are divided by their dtype's maximum (uint8: 255, uint16: 65535);
    other dtypes (floats, booleans) are used as they are, so floats should be in [0, 1].
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {array.shape}")
    if np.issubdtype(array.dtype, np.unsignedinteger):
        scaled = array.astype(np.float32) / np.iinfo(array.dtype).max
    else:
        scaled = array.astype(np.float32)
    return torch.from_numpy(scaled).permute(2, 0, 1).contiguous()


def _finish_image(x: torch.Tensor, size: int | None, normalize: bool) -> torch.Tensor:
    """Resize ``(C, H, W)`` to ``(C, size, size)`` (bilinear, antialiased), then normalise."""
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return (x - 0.5) / 0.5 if normalize else x


def _resize_mask(mask: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize an int64 label map ``(..., H, W)`` with nearest-neighbour sampling."""
    if size is None or mask.shape[-2:] == (size, size):
        return mask
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    resized = F.interpolate(flat, size=(size, size), mode="nearest-exact").long()
    return resized.reshape(*mask.shape[:-2], size, size)


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int (the output side in pixels), got {size!r}")


def _ratio_or_one(numerator: np.ndarray, denominator: np.ndarray, what: str) -> torch.Tensor:
    """``numerator / denominator`` as float32, with 1.0 (and a warning) where it is 0."""
    absent = denominator == 0
    if absent.any():
        warnings.warn(
            f"{what} {np.flatnonzero(absent).tolist()} never occur in this split; their weight "
            "is set to 1.0 (it does not change the loss, since they are never a target)",
            stacklevel=3,
        )
    ratio = np.where(absent, 1.0, numerator / np.maximum(denominator, 1))
    return torch.as_tensor(ratio, dtype=torch.float32)


def _inverse_frequency(counts: np.ndarray) -> torch.Tensor:
    """Class weights ``N / (K * n_c)`` (1 for every class when balanced), shape ``(K,)``."""
    total = np.full(len(counts), counts.sum() / len(counts), dtype=np.float64)
    return _ratio_or_one(total, counts.astype(np.float64), "classes")


# ----------------------------------------------------------------------------- MedMNIST .npz


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The images of ``split`` and the labels of every split present in a MedMNIST file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no MedMNIST file at {path}; pass the path of a .npz file such as the "
            "chestmnist.npz that MedMNIST distributes"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not a readable .npz file ({err}); expected a MedMNIST .npz archive "
            f"with the arrays {_MEDMNIST_KEYS}"
        ) from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds a single array, not a .npz archive; save the splits with "
            f"numpy.savez({_MEDMNIST_KEYS})"
        )
    with npz:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in npz.files:
                raise ValueError(
                    f"{path} has no array {key!r} (it has {', '.join(npz.files)}); a MedMNIST "
                    f"file holds {_MEDMNIST_KEYS}: pick a split it has or add the arrays"
                )
        labels = {s: npz[f"{s}_labels"] for s in SPLITS if f"{s}_labels" in npz.files}
        return npz[f"{split}_images"], labels


def _check_labels(labels: np.ndarray, n_images: int, path: Path, split: str) -> np.ndarray:
    """Labels as ``(N, L)``; raises if the count, shape or values do not fit MedMNIST."""
    labels = labels.reshape(-1, 1) if labels.ndim == 1 else labels
    where = f"{path} [{split}_labels]"
    if labels.ndim != 2 or len(labels) != n_images:
        raise ValueError(
            f"{where} has shape {labels.shape}; expected ({n_images}, 1) class indices or "
            f"({n_images}, L) 0/1 multi-label targets, one row per image"
        )
    if labels.shape[1] > 1 and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{where} has {labels.shape[1]} columns but values other than 0/1")
    if labels.shape[1] == 1 and (labels.min() < 0 or not np.all(labels == np.round(labels))):
        raise ValueError(f"{where} must hold non-negative integer class indices")
    return labels


class MedMNISTDataset(Dataset):
    """One split of a MedMNIST-format ``.npz`` file; build it with :func:`medmnist_npz`.

    Items are ``(image, label)``: ``image`` float32 ``(C, H, W)``; ``label`` an int64 scalar
    (``task == "multiclass"``) or a float32 ``(L,)`` vector of 0/1 (``"multilabel"``).

    Attributes:
        path, split: where the data came from.
        images: the stored uint8 array ``(N, H, W)`` or ``(N, H, W, 3)``, kept as is in memory.
        labels: the stored labels as ``(N, 1)`` or ``(N, L)``.
        task: ``"multiclass"`` (one label column) or ``"multilabel"`` (several 0/1 columns).
        num_classes: classes (max label over every split in the file + 1) or labels ``L``.
        in_channels: channels ``C`` of the returned images.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        size: int | None = None,
        as_rgb: bool | None = None,
        normalize: bool = True,
    ) -> None:
        _check_size(size)
        self.path, self.split = Path(path), split
        self.size, self.normalize = size, normalize
        images, labels = _read_npz(self.path, split)
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
            raise ValueError(
                f"{self.path} [{split}_images] has shape {images.shape}; expected (N, H, W) "
                "grey or (N, H, W, 3) RGB images"
            )
        labels = {s: _check_labels(v, len(v), self.path, s) for s, v in labels.items()}
        self.images = images
        self.labels = _check_labels(labels[split], len(images), self.path, split)
        multilabel = self.labels.shape[1] > 1
        self.task: Literal["multiclass", "multilabel"] = (
            "multilabel" if multilabel else "multiclass"
        )
        self.num_classes = (
            self.labels.shape[1] if multilabel else int(max(v.max() for v in labels.values())) + 1
        )
        stored = 3 if images.ndim == 4 and images.shape[-1] == 3 else 1
        self.in_channels = stored if as_rgb is None else (3 if as_rgb else 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = _to_float(self.images[index])
        if x.shape[0] == 1 and self.in_channels == 3:
            x = x.repeat(3, 1, 1)
        elif x.shape[0] == 3 and self.in_channels == 1:
            x = (x * _LUMA).sum(0, keepdim=True)
        x = _finish_image(x, self.size, self.normalize)
        if self.task == "multilabel":
            return x, torch.as_tensor(self.labels[index], dtype=torch.float32)
        return x, torch.tensor(int(self.labels[index, 0]), dtype=torch.int64)

    def class_weights(self) -> torch.Tensor:
        """Weights for the paper's weighted cross-entropy, from this split's labels.

        Returns:
            ``"multiclass"``: ``(num_classes,)`` inverse frequencies ``N / (K * n_c)``, for
            ``torch.nn.CrossEntropyLoss(weight=...)``. ``"multilabel"``: ``(L,)`` ratios
            ``negatives / positives`` per label, for ``BCEWithLogitsLoss(pos_weight=...)``.
            Classes or labels absent from the split get 1.0 and a warning.
        """
        if self.task == "multiclass":
            counts = np.bincount(self.labels[:, 0].astype(np.int64), minlength=self.num_classes)
            return _inverse_frequency(counts)
        positives = self.labels.sum(0).astype(np.float64)
        return _ratio_or_one(len(self.labels) - positives, positives, "labels")


def medmnist_npz(
    path: str | Path,
    split: str = "train",
    *,
    size: int | None = None,
    as_rgb: bool | None = None,
    normalize: bool = True,
) -> MedMNISTDataset:
    """One split of a MedMNIST ``.npz`` file (e.g. ChestMNIST, any size from 28 to 224 px).

    The file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
    ``test_images``, ``test_labels``; only the requested split's pair must be present. Images
    are uint8 ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB; labels ``(N, 1)`` class indices or
    ``(N, L)`` 0/1 multi-label targets. It is read with ``numpy.load(allow_pickle=False)``.

    Args:
        path: the ``.npz`` file.
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: resize every image to ``size x size`` (bilinear, antialiased); None keeps it.
        as_rgb: True repeats grey images to 3 channels (for ImageNet-style models), False
            converts RGB to grey (ITU-R 601 luma), None keeps the stored channels.
        normalize: scale to [0, 1] then ``(x - 0.5) / 0.5`` (the paper's); False keeps [0, 1].

    Returns:
        A dataset of ``(image, label)``: image float32 ``(C, H, W)``; label int64 scalar
        (multi-class) or float32 ``(L,)`` (multi-label). See :class:`MedMNISTDataset`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown split, not an ``.npz`` archive, a missing array, or arrays whose
            shapes or values do not fit the format.
    """
    return MedMNISTDataset(path, split, size=size, as_rgb=as_rgb, normalize=normalize)


# ----------------------------------------------------------------------------- image folders


def _tifffile() -> ModuleType:
    try:
        import tifffile
    except ImportError as err:
        raise ImportError(
            "reading .tif/.tiff files needs tifffile: pip install tifffile "
            "(or pip install 'bnnconvert[data]')"
        ) from err
    return tifffile


def _read_array(path: Path, *, mask: bool) -> np.ndarray:
    """Read a .png/.jpg (Pillow), .tif/.tiff (tifffile) or .npy (numpy) file as an array.

    Pillow images in palette, alpha or other colour modes become RGB (or L from LA) unless
    ``mask`` is True, where palette indices are kept as the labels.
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".tif", ".tiff"):
        return _tifffile().imread(path)
    with Image.open(path) as img:
        if img.mode == "1":
            img = img.convert("L")
        elif not mask and img.mode == "LA":
            img = img.convert("L")
        elif not mask and img.mode not in ("L", "RGB", "I", "I;16", "F"):
            img = img.convert("RGB")
        return np.asarray(img)


def _label_map(array: np.ndarray, path: Path) -> torch.Tensor:
    """A mask array -> int64 ``(H, W)``; masks holding only 0 and 255 become 0/1."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(
            f"mask {path} has shape {array.shape}; expected (H, W) integer labels: save masks "
            "as single-channel images (0/255 or 0/1 for binary, 0..K-1 for K classes)"
        )
    if array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise ValueError(f"mask {path} holds non-integer values; expected integer labels")
    labels = array.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"mask {path} holds negative values; expected labels 0..K-1")
    if labels.max() == 255 and np.isin(labels, (0, 255)).all():
        labels = labels // 255
    return torch.from_numpy(labels)


def _index_files(folder: Path, extensions: tuple[str, ...], suffix: str = "") -> dict[str, Path]:
    """``{id: path}`` for the files in ``folder`` with one of ``extensions``.

    The id is the file name without extension and without the trailing ``suffix``.
    """
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in extensions:
            continue
        stem = path.stem
        if suffix:
            if not stem.endswith(suffix):
                logger.debug("ignoring %s: its name does not end with %r", path, suffix)
                continue
            stem = stem[: -len(suffix)]
        if stem in index:
            raise ValueError(
                f"{index[stem].name} and {path.name} in {folder} share the id {stem!r}"
            )
        index[stem] = path
    return index


def _check_ids(image_ids: list[str], mask_index: dict[str, Path], mask_dir: Path) -> None:
    """Raise if an image has no mask or a mask has no image."""
    no_mask = sorted(set(image_ids) - set(mask_index))
    no_image = sorted(set(mask_index) - set(image_ids))
    if no_mask or no_image:
        raise ValueError(
            f"images and masks in {mask_dir} do not match: images without a mask "
            f"{no_mask[:5]} ({len(no_mask)} in all), masks without an image {no_image[:5]} "
            f"({len(no_image)} in all); each images/<id>.<ext> needs a masks/<id>.<ext>"
        )


def _split_root(root: str | Path, split: str | None) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {root}; pass the folder that holds images/, masks/")
    if split is None:
        return root
    base = root / split
    if not base.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no split folder {base} (subfolders of {root}: {found}); pass one of those as "
            "split, or split=None if images/ and masks/ sit directly in root"
        )
    return base


def _mask_table(
    mask_dir: Path, image_ids: list[str], suffix: str
) -> tuple[tuple[str, ...], list[list[Path]]]:
    """Raters and ``paths[i][r]``: the mask of image ``i`` by rater ``r``.

    One rater: ``masks/<id>.<ext>``. Several raters: one subfolder per rater,
    ``masks/<rater>/<id>.<ext>``, each holding a mask for every image.
    """
    rater_dirs = sorted(p for p in mask_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    direct = _index_files(mask_dir, MASK_EXTENSIONS, suffix)
    if rater_dirs and direct:
        raise ValueError(
            f"{mask_dir} mixes mask files and rater subfolders; put every mask either directly "
            "in masks/ (one rater) or in masks/<rater>/ (several raters)"
        )
    if not rater_dirs:
        _check_ids(image_ids, direct, mask_dir)
        return (), [[direct[i]] for i in image_ids]
    per_rater = []
    for rater_dir in rater_dirs:
        index = _index_files(rater_dir, MASK_EXTENSIONS, suffix)
        _check_ids(image_ids, index, rater_dir)
        per_rater.append(index)
    return tuple(p.name for p in rater_dirs), [[r[i] for r in per_rater] for i in image_ids]


class SegmentationFolderDataset(Dataset):
    """Images with masks from a folder; build it with :func:`segmentation_folder`.

    Items are ``(image, mask)``: ``image`` float32 ``(C, H, W)``, ``mask`` int64 ``(H, W)``.
    With several raters, each access picks one rater's mask uniformly at random with
    torch's global RNG (``torch.manual_seed`` in the main process; in DataLoader workers
    torch seeds each worker from the loader's generator, see :func:`make_loader`).

    Attributes:
        root: the folder read (``root/split`` when a split was given).
        ids: the image ids, sorted; item ``i`` is ``ids[i]``.
        raters: the rater folder names, sorted; empty with a single mask per image.
        task: ``"segmentation"``.
        in_channels: channels of the first image (every image must match).
        num_classes: given, or 1 + the largest label in any mask (at least 2); inferring it
            reads every mask once.
    """

    task = "segmentation"

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        *,
        size: int | None = None,
        normalize: bool = True,
        mask_suffix: str = "",
        num_classes: int | None = None,
    ) -> None:
        _check_size(size)
        self.root = _split_root(root, split)
        self.size, self.normalize = size, normalize
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"no {folder.name}/ folder in {self.root}; a segmentation folder holds "
                    "images/<id>.<ext> and masks/<id>.<ext> (or masks/<rater>/<id>.<ext>)"
                )
        images = _index_files(image_dir, IMAGE_EXTENSIONS)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
        self.ids = list(images)
        self.image_paths = [images[i] for i in self.ids]
        self.raters, self.mask_paths = _mask_table(mask_dir, self.ids, mask_suffix)
        self.in_channels = int(_to_float(_read_array(self.image_paths[0], mask=False)).shape[0])
        if num_classes is not None:
            self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, index: int) -> torch.Tensor:
        path = self.image_paths[index]
        x = _to_float(_read_array(path, mask=False))
        if x.shape[0] != self.in_channels:
            raise ValueError(
                f"image {path} has {x.shape[0]} channels but the first image has "
                f"{self.in_channels}; convert the images to one colour mode"
            )
        return x

    def _mask(self, index: int, rater: int) -> torch.Tensor:
        path = self.mask_paths[index][rater]
        return _label_map(_read_array(path, mask=True), path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rater = int(torch.randint(len(self.raters), ())) if len(self.raters) > 1 else 0
        x, mask = self._image(index), self._mask(index, rater)
        if x.shape[-2:] != mask.shape:
            raise ValueError(
                f"image {self.image_paths[index]} is {tuple(x.shape[-2:])} but its mask "
                f"{self.mask_paths[index][rater]} is {tuple(mask.shape)}; they must match"
            )
        return _finish_image(x, self.size, self.normalize), _resize_mask(mask, self.size)

    def all_masks(self, index: int) -> torch.Tensor:
        """Every rater's mask of item ``index``, int64 ``(R, H, W)`` in ``raters`` order."""
        masks = torch.stack([self._mask(index, r) for r in range(len(self.mask_paths[index]))])
        return _resize_mask(masks, self.size)

    @cached_property
    def _pixel_counts(self) -> np.ndarray:
        """Pixels per label over every mask of every rater (read once, at native size)."""
        logger.info(
            "reading %d masks of %s to count labels",
            len(self) * max(1, len(self.raters)),
            self.root,
        )
        counts = np.zeros(2, dtype=np.int64)
        for index in range(len(self)):
            for rater in range(len(self.mask_paths[index])):
                found = np.bincount(self._mask(index, rater).numpy().ravel())
                counts = np.pad(counts, (0, max(0, len(found) - len(counts))))
                counts[: len(found)] += found
        return counts

    @cached_property
    def num_classes(self) -> int:  # overridden by the constructor's num_classes
        return len(self._pixel_counts)

    def class_weights(self) -> torch.Tensor:
        """Inverse pixel frequencies ``N / (K * n_c)``, float32 ``(num_classes,)``.

        For ``torch.nn.CrossEntropyLoss(weight=...)``; counted over every mask once.
        """
        counts = self._pixel_counts
        if len(counts) > self.num_classes:
            raise ValueError(
                f"the masks in {self.root} hold label {len(counts) - 1} but num_classes is "
                f"{self.num_classes}; pass a larger num_classes"
            )
        return _inverse_frequency(np.pad(counts, (0, self.num_classes - len(counts))))


def segmentation_folder(
    root: str | Path,
    split: str | None = None,
    *,
    size: int | None = None,
    normalize: bool = True,
    mask_suffix: str = "",
    num_classes: int | None = None,
) -> SegmentationFolderDataset:
    """Images and masks from an ISIC-style folder, with one or several raters (LIDC-style).

    Layout (``root/<split>/`` instead of ``root/`` when ``split`` is given)::

        root/images/<id>.<png|jpg|jpeg|tif|tiff|npy>
        root/masks/<id><mask_suffix>.<png|tif|tiff|npy>            one rater
        root/masks/<rater>/<id><mask_suffix>.<png|tif|tiff|npy>    several raters

    With rater subfolders, every rater needs a mask for every image; each item access picks
    one rater at random (torch's global RNG), as the paper does for LIDC-IDRI, and
    :meth:`~SegmentationFolderDataset.all_masks` returns them all. Images are ``(H, W)`` or
    channels-last ``(H, W, C)``; unsigned integers are scaled by their dtype's maximum, floats
    are taken to be in [0, 1]. Masks are single-channel integer labels; masks holding only
    0 and 255 are read as 0/1. Files with other extensions (e.g. ``LICENSE.txt``) are ignored.

    Args:
        root: the dataset folder.
        split: a subfolder of ``root`` (e.g. ``"train"``, ``"test"``), or None.
        size: resize images (bilinear) and masks (nearest) to ``size x size``; needed to
            batch images of different sizes. None keeps the stored size.
        normalize: scale to [0, 1] then ``(x - 0.5) / 0.5`` (the paper's); False keeps [0, 1].
        mask_suffix: the part of a mask's name after the id, e.g. ``"_segmentation"`` for the
            ISIC challenge files ``ISIC_0000000_segmentation.png``.
        num_classes: the number of classes; None infers it by reading every mask once.

    Returns:
        A dataset of ``(image, mask)``: image float32 ``(C, H, W)``, mask int64 ``(H, W)``.
        See :class:`SegmentationFolderDataset`.

    Raises:
        FileNotFoundError: ``root``, the split, ``images/`` or ``masks/`` is missing, or no
            image is found.
        ValueError: images and masks do not match one to one, or a file is malformed.
    """
    return SegmentationFolderDataset(
        root,
        split,
        size=size,
        normalize=normalize,
        mask_suffix=mask_suffix,
        num_classes=num_classes,
    )
