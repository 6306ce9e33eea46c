"""``bnnconvert predict`` and :func:`bnnconvert.cases.predict_cases`: the per-case table,
arrays and maps on the bundled digits and nuclei, checked against the Python API's
``bnnconvert.predict`` under the same seed."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

import bnnconvert
from bnnconvert.cases import predict_cases
from bnnconvert.cli import main
from bnnconvert.data import open_data
from bnnconvert.models import UNet
from tests.test_cli import small_cnn

SEED, S = 7, 3


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Converted models saved as files: a small CNN (digits), a small UNet (nuclei)."""
    root = tmp_path_factory.mktemp("cases")
    torch.manual_seed(0)
    cnn = bnnconvert.convert(small_cnn(num_classes=10), "magnitude", 0.2)
    bnnconvert.save(
        cnn, root / "digits.pt", arch="tests.test_cli:small_cnn", arch_kwargs={"num_classes": 10}
    )
    unet = bnnconvert.convert(UNet(1, 2, base=4, depth=2).eval(), "magnitude", 0.05)
    bnnconvert.save(
        unet, root / "nuclei.pt", arch="bnnconvert.models:UNet", arch_kwargs={"base": 4, "depth": 2}
    )
    return root


def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(*args) -> str:
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _api(path: Path, data: str, batch_size: int) -> bnnconvert.Prediction:
    """The Python API's prediction of the saved model on the test split, same seed."""
    model = bnnconvert.load(path)
    torch.manual_seed(SEED)
    return bnnconvert.predict(model, open_data(data, "test", batch_size=batch_size), S)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) for r in rows])


def _top(scores: np.ndarray, fraction: float) -> list[int]:
    """The indices of the ceil(fraction * N) highest scores, ties by index."""
    count = math.ceil(fraction * len(scores))
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count]


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def digits_run(ws):
    out = ws / "digits_cases"
    args = ["--samples", S, "--seed", SEED, "--batch-size", 100, "--flag-top", 0.1]
    _ok("predict", ws / "digits.pt", "--data", "demo:digits", "-o", out, *args, "--keep-samples")
    return out, _api(ws / "digits.pt", "demo:digits", 100)


def test_digits_arrays_equal_the_api(digits_run):
    out, api = digits_run
    arrays = np.load(out / "cases.npz")
    assert arrays["probs"].shape == (500, 10) and arrays["samples"].shape == (S, 500, 10)
    np.testing.assert_allclose(arrays["probs"], api.probs.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(arrays["samples"], api.samples.numpy(), rtol=0, atol=1e-7)
    for name in ("entropy", "expected_entropy", "mutual_info"):
        np.testing.assert_allclose(arrays[name], getattr(api, name).numpy(), atol=1e-7)
    np.testing.assert_allclose(arrays["variance"], api.samples.var(0, correction=0), atol=1e-9)
    assert (arrays["mutual_info"] > 0).all()  # the samples differ: a Bayesian model
    np.testing.assert_array_equal(arrays["prediction"], api.probs.argmax(1).numpy())
    labels = np.load(Path(bnnconvert.__file__).parent / "demo_data" / "digits.npz")["test_labels"]
    np.testing.assert_array_equal(arrays["targets"], labels.ravel())


def test_digits_table_equals_the_api(digits_run):
    out, api = digits_run
    rows = _rows(out / "cases.csv")
    assert len(rows) == 500 and [r["index"] for r in rows] == [str(i) for i in range(500)]
    pred = api.probs.argmax(1)
    assert [int(r["prediction"]) for r in rows] == pred.tolist()
    assert [int(r["target"]) for r in rows] == api.targets.tolist()
    np.testing.assert_allclose(_column(rows, "confidence"), api.probs.max(1).values, atol=1e-7)
    for name in ("entropy", "expected_entropy", "mutual_info"):
        np.testing.assert_allclose(_column(rows, name), getattr(api, name), atol=1e-7)
    chosen = api.samples.var(0, correction=0).gather(1, pred[:, None])[:, 0]
    np.testing.assert_allclose(_column(rows, "variance"), chosen, atol=1e-9)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["samples"] == S and manifest["cases"] == 500 and manifest["seed"] == SEED
    assert sorted(manifest["files"]) == ["cases.csv", "cases.npz", "flagged.csv"]


def test_flag_top_lists_the_most_uncertain_digits(digits_run):
    out, api = digits_run
    flagged = _rows(out / "flagged.csv")
    expected = _top(api.entropy.double().numpy(), 0.1)
    assert len(flagged) == 50
    assert [int(r["index"]) for r in flagged] == expected
    assert [int(r["rank"]) for r in flagged] == list(range(1, 51))


# ----------------------------------------------------------------------- segmentation
def test_nuclei_maps_and_table_equal_the_api(ws):
    out = ws / "nuclei_cases"
    args = ["--samples", S, "--seed", SEED, "--batch-size", 4, "--flag-top", 0.25]
    _ok("predict", ws / "nuclei.pt", "--data", "demo:nuclei", "-o", out, *args)
    api = _api(ws / "nuclei.pt", "demo:nuclei", 4)
    ids = open_data("demo:nuclei", "test").dataset.ids
    rows = _rows(out / "cases.csv")
    assert [r["id"] for r in rows] == ids and len(ids) == 16
    for i, row in enumerate(rows):
        maps = out / row["maps"]
        assert maps == out / "cases" / ids[i]
        probs = np.load(maps / "probs.npy")
        assert probs.shape == (2, 64, 64)
        np.testing.assert_allclose(probs, api.probs[i], atol=1e-7)
        for name in ("entropy", "expected_entropy", "mutual_info"):
            value = np.load(maps / f"{name}.npy")
            assert value.shape == (64, 64)
            np.testing.assert_allclose(value, getattr(api, name)[i], atol=1e-7)
        np.testing.assert_allclose(np.load(maps / "variance.npy"), api.variance[i], atol=1e-9)
        np.testing.assert_array_equal(np.load(maps / "mask.npy"), api.probs[i].argmax(0))
        with Image.open(maps / "overlay.png") as png:
            assert png.size == (1200, 400)
    means = {n: getattr(api, n).double().flatten(1).mean(1) for n in ("entropy", "mutual_info")}
    for name, value in means.items():
        np.testing.assert_allclose(_column(rows, name), value, rtol=1e-12)
    pred, true = api.probs.argmax(1).numpy() == 1, api.targets.numpy() == 1
    tp = (pred & true).sum((1, 2))
    dice = 2 * tp / (2 * tp + (pred & ~true).sum((1, 2)) + (~pred & true).sum((1, 2)))
    np.testing.assert_allclose(_column(rows, "dice"), dice, rtol=1e-12)
    np.testing.assert_allclose(_column(rows, "prediction_foreground"), pred.mean((1, 2)))
    flagged = [int(r["index"]) for r in _rows(out / "flagged.csv")]
    assert flagged == _top(means["entropy"].numpy(), 0.25) and len(flagged) == 4


# ----------------------------------------------------------------------- the output folder
def test_a_folder_with_files_is_refused_unless_overwrite(ws, tmp_path):
    out = tmp_path / "cases"
    base = ["predict", ws / "digits.pt", "--data", "demo:digits", "-o", out, "--samples", 2]
    _ok(*base, "--flag-top", 0.5)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    result = _cli(*base, "--flag-top", 0.2)
    assert result.exit_code == 1
    assert "not empty" in result.output and "--overwrite" in result.output
    assert _snapshot(out) == before
    _ok(*base, "--overwrite")
    assert not (out / "flagged.csv").exists()  # the earlier run's file is gone
    assert (out / "notes.txt").read_text() == "mine"  # other files stay
    assert json.loads((out / "run.json").read_text())["flag_top"] is None


class _FailsAfterFirstBatch(nn.Module):
    """A model whose forward raises on any batch that does not start with the first image
    it saw: the fit check and the first predicted batch pass, the second batch fails."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.first: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = x[0].detach().clone()
        elif not torch.equal(x[0], self.first):
            raise RuntimeError("simulated failure on a later batch")
        return self.net(x)


def fails_after_first_batch(num_classes: int = 10) -> nn.Module:
    """A factory for ``--arch tests.test_predict_cases:fails_after_first_batch``."""
    return _FailsAfterFirstBatch(small_cnn(num_classes=num_classes))


def test_a_run_that_fails_midway_leaves_no_output(tmp_path):
    torch.manual_seed(0)
    torch.save(fails_after_first_batch().state_dict(), tmp_path / "net.pt")
    out = tmp_path / "cases"
    arch = ["--arch", "tests.test_predict_cases:fails_after_first_batch"]
    args = ["--data", "demo:digits", "-o", out, "--batch-size", 100, "--samples", 2]
    result = _cli("predict", tmp_path / "net.pt", *arch, *args)
    assert result.exit_code == 1, result.output
    assert "simulated failure on a later batch" in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]  # no staging folder left


def test_a_failed_overwrite_keeps_the_earlier_run(tmp_path):
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, 3, padding=1)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 2, (2, 8, 8), generator=g))
        for _ in range(3)
    ]
    out = tmp_path / "out"
    predict_cases(net, batches, out, samples=1)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    failing = _FailsAfterFirstBatch(net)
    failing(batches[0][0])  # it remembers the first batch (as the CLI's fit check does)
    with pytest.raises(RuntimeError, match="simulated failure"):
        predict_cases(failing, batches, out, samples=1, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    report = predict_cases(net, batches[:2], out, samples=1, overwrite=True)
    assert report.folder == out and all(p.is_file() for p in report.files)
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["0", "1", "2", "3"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--flag-top", "0"], 2, "(0, 1]"),
        (["--flag-top", "1.5"], 2, "(0, 1]"),
        (["--samples", "0"], 2, "x>=1"),
        (["--data", "demo:nuclei"], 1, "do not fit"),
        (["--data", "demo:nothing"], 1, "unknown bundled data set"),
        (["--split", "nosuch"], 1, "nosuch"),
    ],
)
def test_bad_input_fails_without_output(ws, tmp_path, args, code, words):
    out = tmp_path / "cases"
    data = [] if "--data" in args else ["--data", "demo:digits"]
    result = _cli("predict", ws / "digits.pt", *data, "-o", out, *args)
    assert result.exit_code == code and words in result.output, result.output
    assert not out.exists()


def test_missing_model_and_file_as_folder_fail(ws, tmp_path):
    result = _cli("predict", tmp_path / "none.pt", "--data", "demo:digits", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "none.pt" in result.output
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    result = _cli("predict", ws / "digits.pt", "--data", "demo:digits", "-o", tmp_path / "file")
    assert result.exit_code != 0 and (tmp_path / "file").read_text() == "x"


# ----------------------------------------------------------------------- the library
def test_library_checks_and_keeps_the_global_rng(ws, tmp_path):
    model = bnnconvert.load(ws / "digits.pt")
    loader = open_data("demo:digits", "test", batch_size=250)
    with pytest.raises(TypeError, match="iterable of batches"):
        predict_cases(model, torch.zeros(2, 1, 28, 28), tmp_path / "a")
    with pytest.raises(ValueError, match="flag_top"):
        predict_cases(model, loader, tmp_path / "a", flag_top=0.0)
    with pytest.raises(ValueError, match="task"):
        predict_cases(model, loader, tmp_path / "a", task="regression")
    with pytest.raises(ValueError, match="no batch"):
        predict_cases(model, [], tmp_path / "a")
    assert not (tmp_path / "a").exists()
    state = torch.get_rng_state()
    report = predict_cases(model, loader, tmp_path / "b", samples=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = predict_cases(model, loader, tmp_path / "c", samples=2, seed=3)
    np.testing.assert_array_equal(report.entropy, again.entropy)
    plain = predict_cases(bnnconvert.to_deterministic(model), loader, tmp_path / "d", samples=4)
    assert plain.samples == 1 and (np.load(tmp_path / "d" / "cases.npz")["mutual_info"] == 0).all()


def test_multilabel_rows_use_the_sigmoid(tmp_path):
    torch.manual_seed(0)
    model = bnnconvert.convert(small_cnn(num_classes=3), "magnitude", 0.3)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 1, 28, 28, generator=g), torch.randint(0, 2, (5, 3))) for _ in range(2)
    ]
    report = predict_cases(model, batches, tmp_path / "ml", samples=S, seed=SEED, task="multilabel")
    torch.manual_seed(SEED)
    api = bnnconvert.predict(model, batches, S, activation="sigmoid")
    rows = _rows(tmp_path / "ml" / "cases.csv")
    positives = [" ".join(str(j) for j in range(3) if p[j] > 0.5) for p in api.probs]
    assert report.task == "multilabel" and [r["prediction"] for r in rows] == positives
    np.testing.assert_allclose(_column(rows, "entropy"), api.entropy.double().mean(1), rtol=1e-12)
    expected = [" ".join(str(j) for j in range(3) if t[j]) for t in api.targets]
    assert [r["target"] for r in rows] == expected


class _NiftiVolumes(Dataset):
    """Three 8^3 volumes stored as NIfTI files, read in order (``image_paths``, ``ids``)."""

    task = "segmentation"

    def __init__(self, root: Path, affine: np.ndarray) -> None:
        import nibabel

        rng = np.random.default_rng(0)
        self.ids = [f"vol{i}" for i in range(3)]
        self.image_paths = [root / f"{i}.nii.gz" for i in self.ids]
        for path in self.image_paths:
            nibabel.save(nibabel.Nifti1Image(rng.random((8, 8, 8), dtype=np.float32), affine), path)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        import nibabel

        volume = np.asarray(nibabel.load(self.image_paths[index]).dataobj, dtype=np.float32)
        return torch.from_numpy(volume)[None], torch.from_numpy((volume > 0.5).astype(np.int64))


def test_nifti_inputs_get_nifti_maps_with_their_affine(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = (10.0, -4.0, 3.0)
    loader = DataLoader(_NiftiVolumes(tmp_path, affine), batch_size=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    model = bnnconvert.convert(net, "magnitude", 0.5)
    predict_cases(model, loader, tmp_path / "out", samples=2, seed=0)
    case = tmp_path / "out" / "cases" / "vol1"
    probs = nibabel.load(case / "probs.nii.gz")
    assert probs.shape == (8, 8, 8, 2)
    np.testing.assert_allclose(probs.affine, affine)
    np.testing.assert_allclose(np.moveaxis(probs.get_fdata(), -1, 0), np.load(case / "probs.npy"))
    for name in ("entropy", "mutual_info", "mask"):
        image = nibabel.load(case / f"{name}.nii.gz")
        np.testing.assert_allclose(image.get_fdata(), np.load(case / f"{name}.npy"), rtol=1e-6)
        np.testing.assert_allclose(image.affine, affine)


def test_mapping_batches_give_the_tuple_batches_values(ws, tmp_path):
    from bnnconvert._utils import BatchFormat

    model = bnnconvert.load(ws / "nuclei.pt")
    pairs = list(open_data("demo:nuclei", "test", batch_size=4))[:2]
    dicts = [{"image": x, "label": y} for x, y in pairs]
    predict_cases(model, pairs, tmp_path / "tuples", samples=2, seed=SEED)
    fmt = BatchFormat("image", "label")
    predict_cases(model, dicts, tmp_path / "dicts", samples=2, seed=SEED, batch_format=fmt)
    assert _rows(tmp_path / "tuples" / "cases.csv") == _rows(tmp_path / "dicts" / "cases.csv")
    for name in ("probs.npy", "mutual_info.npy", "overlay.png"):
        tuples = (tmp_path / "tuples" / "cases" / "7" / name).read_bytes()
        assert tuples == (tmp_path / "dicts" / "cases" / "7" / name).read_bytes()
