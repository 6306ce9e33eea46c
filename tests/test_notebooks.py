"""The example notebooks: stored with the outputs of a real run, and they execute.

The execution runs each notebook in a fresh kernel ("python3": the ipykernel of the
interpreter running the tests, jupyter_client swaps "python" in the kernel spec for
``sys.executable``) with ``BNNCONVERT_QUICK=1``, the tiny budget of its parameter cell.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from torch import nn

from bnnconvert.models import resnet18

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = ["resnet18_classification.ipynb", "unet_segmentation.ipynb"]


def read(name: str):
    return nbformat.read(EXAMPLES / name, as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def outputs(nb, kind: str) -> list:
    return [o for c in code_cells(nb) for o in c.outputs if o.output_type == kind]


def text(nb) -> str:
    return "".join(o.get("text", "") for o in outputs(nb, "stream") if o.name == "stdout")


def images(nb) -> list[str]:
    shown = outputs(nb, "display_data") + outputs(nb, "execute_result")
    return [o.data["image/png"] for o in shown if "image/png" in o.data]


def metric_rows(stdout: str, names: tuple[str, ...]) -> dict[str, list[float]]:
    """{row name: numbers} of the notebook's printed metrics table."""
    rows = {}
    for line in stdout.splitlines():
        for name in names:
            if line.startswith(name):
                rows[name] = [float(v) for v in line[len(name) :].split()]
    return rows


# ----------------------------------------------------------------------- stored
FULL_RUN = {  # what the stored outputs print with the default (not QUICK) parameters
    "resnet18_classification.ipynb": "1000 training, 500 test, 500 OOD images",
    "unet_segmentation.ipynb": "135 training tiles, 16 test tiles",
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_has_the_outputs_of_a_full_run(name):
    path = EXAMPLES / name
    assert path.stat().st_size < 1_000_000
    nb = read(name)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert all(c.execution_count for c in cells), "store the notebook executed, every cell"
    assert not outputs(nb, "error")
    assert "QUICK" in cells[0].source and "BNNCONVERT_QUICK" in cells[0].source
    assert nb.metadata.kernelspec.name == "python3"
    assert images(nb), "the uncertainty plots are stored"
    assert FULL_RUN[name] in text(nb)  # not the tiny budget of the tests


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
def test_classification_notebook_runs_the_three_steps(monkeypatch):
    nb = execute("resnet18_classification.ipynb", monkeypatch)
    stdout = text(nb)
    assert "400 training, 100 test, 100 OOD images" in stdout
    # k = round(1 % of the Conv/Linear entries): one sigma per Bayesian entry, counted here
    net = resnet18(num_classes=10, in_channels=1)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    entries = sum(p.numel() for m in layers for p in m.parameters())
    k = int(re.search(r"parameters added by the conversion: ([\d,]+)", stdout)[1].replace(",", ""))
    assert k == round(0.01 * entries)
    assert f"{k:,} of {entries:,} entries selected" in stdout
    rows = metric_rows(stdout, ("deterministic (+E)", "partial 1%"))
    assert len(rows) == 2 and all(len(v) == 6 for v in rows.values())
    for accuracy, nll, ece, brier, entropy, ood in rows.values():
        assert 0 <= accuracy <= 1 and 0 <= ece <= 1 and 0 <= ood <= 1 and nll > 0
        assert 0 <= brier <= 2 and 0 <= entropy <= math.log(10) + 1e-4
        # it learned: far above chance (10 classes), and the photographs are told from
        # the digits by the entropy better than a coin flip
        assert accuracy > 0.1 + 0.35 and nll < math.log(10)
        assert ood > 0.5 + 0.05
    assert len(images(nb)) == 3  # two reliability diagrams, the entropy histograms


@pytest.mark.integration
def test_segmentation_notebook_runs_the_three_steps(monkeypatch):
    nb = execute("unet_segmentation.ipynb", monkeypatch)
    stdout = text(nb)
    assert "60 training tiles, 16 test tiles" in stdout
    rows = metric_rows(stdout, ("deterministic (+E)", "partial 1%"))
    assert len(rows) == 2
    for dice, iou, *_ in rows.values():
        assert 0 <= iou <= dice <= 1  # IoU = Dice / (2 - Dice) <= Dice
        assert dice > 0.5  # it learned (an all-background mask scores 0)
    assert re.search(r"total\s+[\d,]+\s+[\d,]+\s+1\.00%", stdout)  # the 1 % of bayes_summary
    assert len(images(nb)) == 2  # the overlay and entropy map of two tiles
