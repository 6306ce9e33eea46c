"""The example notebooks: stored with the outputs of a full-budget run, and they execute.

The execution runs each notebook in a fresh kernel ("python3": the ipykernel of the
interpreter running the tests, jupyter_client swaps "python" in the kernel spec for
``sys.executable``) with ``BNNCONVERT_QUICK=1``, the tiny budget of its parameter cell.

The same checks read the stored outputs (full budget) and the fresh ones (quick budget):
the tables hold what the notebook computes (the calibration's choice is the minimum of its
printed curve and is what the report and the predictions use; temperature scaling and the
model at its means keep the checkpoint's predictions; a posterior calibrated to t = 0 is
temperature scaling), and the models learned (accuracy and Dice far above chance).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from bnnconvert import last_layer_masks
from bnnconvert.layers import convertible_parameters
from bnnconvert.models import UNet, resnet18

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLASSIFICATION = "resnet18_classification.ipynb"
SEGMENTATION = "unet_segmentation.ipynb"
NOTEBOOKS = [CLASSIFICATION, SEGMENTATION]

DATA_LINE = {  # (full budget, quick budget)
    CLASSIFICATION: (
        "4000 training, 500 validation, 500 test, 500 OOD images",
        "400 training, 100 validation, 100 test, 100 OOD images",
    ),
    SEGMENTATION: (
        "135 training tiles, 15 validation tiles, 16 test tiles",
        "60 training tiles, 15 validation tiles, 16 test tiles",
    ),
}
CLASSIFICATION_ROWS = (
    "checkpoint",
    "temperature scaling",
    "last-layer Laplace (laplace-torch)",
    "posterior (laplace, last layer)",
    "posterior at its means",
    "posterior (laplace, grad2 1 %)",
)
SEGMENTATION_ROWS = (
    "checkpoint",
    "temperature scaling",
    "posterior (laplace, grad2 1 %)",
    "posterior at its means",
)
NUMBER = r"-?\d+(?:\.\d+)?"


# ----------------------------------------------------------------------- reading outputs
def read(name: str):
    return nbformat.read(EXAMPLES / name, as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def outputs(nb, kind: str) -> list:
    return [o for c in code_cells(nb) for o in c.outputs if o.output_type == kind]


def text(nb, stream: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in outputs(nb, "stream") if o.name == stream)


def images(nb) -> list[str]:
    shown = outputs(nb, "display_data") + outputs(nb, "execute_result")
    return [o.data["image/png"] for o in shown if "image/png" in o.data]


def metrics_table(stdout: str, rows: tuple[str, ...], columns: list[str]) -> dict:
    """{row: {column: value}} of the printed comparison table (header, then one line per
    row: the name, then the numbers)."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == columns)
    table = {}
    for line in lines[header + 1 : header + 1 + len(rows)]:
        match = re.fullmatch(rf"(\S.*?)\s{{2,}}({NUMBER}(?:\s+{NUMBER})*)\s*", line)
        assert match, f"not a table row: {line!r}"
        table[match[1]] = dict(zip(columns, map(float, match[2].split()), strict=True))
    assert tuple(table) == rows
    return table


def curve(stdout: str) -> list[tuple[float, float, float, bool]]:
    """The printed calibration curve: (t, T, validation NLL, chosen) per scale tried."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["t", "T", "val", "NLL"])
    rows = []
    for line in lines[header + 1 :]:
        match = re.fullmatch(rf"\s*({NUMBER})\s+({NUMBER})\s+({NUMBER})(  <- chosen)?", line)
        if not match:
            break
        rows.append((float(match[1]), float(match[2]), float(match[3]), bool(match[4])))
    return rows


def calibrations(stdout: str) -> list[tuple[float, float, float]]:
    """(t, T, validation NLL) of every printed PosteriorReport, in order."""
    pattern = (
        rf"calibrated on validation data: scale t = ({NUMBER}), temperature T = ({NUMBER}), "
        rf"validation NLL ({NUMBER})"
    )
    return [tuple(map(float, m)) for m in re.findall(pattern, stdout)]


def value(pattern: str, stdout: str) -> float:
    match = re.search(pattern, stdout)
    assert match, f"{pattern!r} not printed"
    return float(match[1])


def close(a: float, b: float, rel: float = 2e-3) -> bool:
    """Equal to the printed precision (4 significant digits, T refitted by LBFGS)."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-4)


# ----------------------------------------------------------------------- the checks
def check_calibration(stdout: str, report_index: int) -> tuple[float, float]:
    """The printed curve is the report's: its chosen row is the minimum, the report's
    (t, T, NLL), and its t = 0 row is temperature scaling (the same T). Returns (t, T)."""
    rows = curve(stdout)
    assert len(rows) >= 9 and rows[0][0] == 0 and [r[0] for r in rows] == sorted(r[0] for r in rows)
    chosen = [r for r in rows if r[3]]
    assert len(chosen) == 1
    t, temperature, nll, _ = chosen[0]
    assert nll == min(r[2] for r in rows)
    reported = calibrations(stdout)[report_index]
    assert close(reported[0], t) and close(reported[1], temperature) and close(reported[2], nll)
    ts = value(rf"temperature scaling: T = ({NUMBER})", stdout)
    assert close(rows[0][1], ts)
    assert value(rf"the posterior: t = ({NUMBER})", stdout) == pytest.approx(t, rel=1e-3)
    assert value(rf"the posterior: t = {NUMBER}, T = ({NUMBER})", stdout) == pytest.approx(
        temperature, rel=1e-3
    )
    return t, temperature


def check_classification(nb, quick: bool) -> None:
    stdout = text(nb)
    assert DATA_LINE[CLASSIFICATION][quick] in stdout
    assert "recommended recipe: bnnconvert: laplace, last layer (classification)" in stdout
    # the recipe: every weight and bias of fc; the paper's selection: round(1 %) of all
    model = resnet18(num_classes=10, in_channels=1)
    k_last = sum(int(m.sum()) for m in last_layer_masks(model).values())
    entries = sum(p.numel() for p in convertible_parameters(model).values())
    assert k_last == 10 * 512 + 10
    assert re.search(rf"\nfc\s+Linear\s+linear\s+{k_last:,}\s+{k_last:,}\s+100\.00%", stdout)
    reports = re.findall(r"posterior: laplace, ([\d,]+) Bayesian entries", stdout)
    assert reports == [f"{k_last:,}", f"{round(0.01 * entries):,}"]
    t, _ = check_calibration(stdout, 0)
    assert re.search(rf"total\s+{entries:,}\s+{round(0.01 * entries):,}\s+1\.00%", stdout)

    # other draws of the calibration: the same posterior, t and T chosen again
    assert len(re.findall(r"seed \d: scale t = ", stdout)) == 4

    table = metrics_table(stdout, CLASSIFICATION_ROWS, ["accuracy", "nll", "ece", "ood_auroc"])
    for row in table.values():
        assert 0 <= row["ece"] <= 1 and 0 <= row["ood_auroc"] <= 1
        # it learned: far above chance (10 classes)
        assert row["accuracy"] > (0.9 if not quick else 0.1 + 0.35)
        assert 0 < row["nll"] < math.log(10)
    checkpoint, scaled = table["checkpoint"], table["temperature scaling"]
    # a temperature and the means (the checkpoint's weights) keep the checkpoint's classes
    assert scaled["accuracy"] == checkpoint["accuracy"]
    assert table["posterior at its means"]["accuracy"] == checkpoint["accuracy"]
    # a posterior calibrated to t = 0 is temperature scaling
    grad2_t = calibrations(stdout)[1][0]
    for name, scale in (
        ("posterior (laplace, last layer)", t),
        ("posterior (laplace, grad2 1 %)", grad2_t),
    ):
        if scale == 0:
            assert table[name] == scaled
    if not quick:  # the full budget: the photographs are told from the digits
        assert all(row["ood_auroc"] > 0.6 for row in table.values())
        assert scaled["nll"] < checkpoint["nll"]  # temperature scaling helps this checkpoint
    # the prediction's FLOPs with the hoisted prefix counted once: the last layer's S draws
    # cost about one forward, the grad2 selection (from conv1 on) S forwards
    flops = dict(
        re.findall(
            r"posterior \((laplace, [^)]+)\): [\d.]+x the checkpoint's "
            r"prediction time .*?, ([\d.]+)x its FLOPs \(the hoisted",
            stdout,
        )
    )
    assert set(flops) == {"laplace, last layer", "laplace, grad2 1 %"}
    assert 1 <= float(flops["laplace, last layer"]) < 1.1  # 300 draws of a 512 x 10 layer
    assert float(flops["laplace, grad2 1 %"]) == pytest.approx(10, rel=0.02)  # S = 10
    # the curve, two reliability diagrams, the entropy histograms
    assert len(images(nb)) == 4


def check_segmentation(nb, quick: bool) -> None:
    stdout = text(nb)
    assert DATA_LINE[SEGMENTATION][quick] in stdout
    assert "recommended recipe for segmentation: bnnconvert: laplace, grad2" in stdout
    model = UNet(in_channels=1, num_classes=2, base=8 if quick else 16)
    entries = sum(p.numel() for p in convertible_parameters(model).values())
    k = round(0.01 * entries)
    assert re.search(rf"total\s+{entries:,}\s+{k:,}\s+1\.00%", stdout)
    # Laplace: a curvature pass and no training epoch
    assert f"posterior: laplace, {k:,} Bayesian entries" in stdout
    assert "time: curvature" in stdout and "epochs:" not in stdout
    t, _ = check_calibration(stdout, 0)

    table = metrics_table(stdout, SEGMENTATION_ROWS, ["dice", "iou", "nll", "ece"])
    for row in table.values():
        assert 0 <= row["iou"] <= row["dice"] <= 1  # IoU = Dice / (2 - Dice) <= Dice
        assert row["dice"] > (0.85 if not quick else 0.5)  # an all-background mask scores 0
        assert 0 < row["nll"] < math.log(2) and 0 <= row["ece"] <= 1
    checkpoint, scaled = table["checkpoint"], table["temperature scaling"]
    assert scaled["dice"] == checkpoint["dice"]  # a temperature keeps every pixel's class
    assert table["posterior at its means"]["dice"] == checkpoint["dice"]  # means = checkpoint
    if t == 0:
        assert table["posterior (laplace, grad2 1 %)"] == scaled
    pixels = re.findall(r"on the ([\d,]+) wrong pixels, [\d.]+ on the ([\d,]+) right", stdout)
    assert len(pixels) == 2
    for wrong, right in pixels:
        assert int(wrong.replace(",", "")) + int(right.replace(",", "")) == 16 * 64 * 64
    assert len(images(nb)) == 1  # the overlay and entropy map of one test tile


CHECKS = {CLASSIFICATION: check_classification, SEGMENTATION: check_segmentation}


# ----------------------------------------------------------------------- stored
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_has_the_outputs_of_a_full_run(name):
    path = EXAMPLES / name
    assert path.stat().st_size < 1_000_000
    nb = read(name)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert all(c.execution_count for c in cells), "store the notebook executed, every cell"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert not outputs(nb, "error") and not text(nb, "stderr")
    assert "QUICK" in cells[0].source and "BNNCONVERT_QUICK" in cells[0].source
    assert nb.metadata.kernelspec.name == "python3"
    CHECKS[name](nb, quick=False)  # not the tiny budget of the tests
    # the wall time stated in the markdown is the one the stored run measured
    seconds = int(value(r"notebook wall time: (\d+) s \(full budget", text(nb)))
    prose = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert f"Full-budget wall time: **{seconds} s**" in prose  # tools/run_notebooks.py


# ----------------------------------------------------------------------- execution
def execute(name: str, monkeypatch):
    monkeypatch.setenv("BNNCONVERT_QUICK", "1")
    nb = read(name)
    for cell in code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    return nb


@pytest.mark.integration
def test_classification_notebook_runs_the_recipe(monkeypatch):
    nb = execute(CLASSIFICATION, monkeypatch)
    check_classification(nb, quick=True)
    assert "notebook wall time" in text(nb) and "(quick budget" in text(nb)


@pytest.mark.integration
def test_segmentation_notebook_runs_the_recipe(monkeypatch):
    nb = execute(SEGMENTATION, monkeypatch)
    check_segmentation(nb, quick=True)
    assert "notebook wall time" in text(nb) and "(quick budget" in text(nb)
