"""bnnconvert.plots: each figure renders to a PNG of the expected pixel size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure
from matplotlib.image import imread

from bnnconvert import plots


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG file."""
    height, width = imread(str(path)).shape[:2]
    return width, height


def disk(size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).long()


def test_reliability_diagram_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(500, 4, generator=g)
    targets = torch.distributions.Categorical(logits=0.6 * logits).sample()
    path = tmp_path / "reliability.png"
    fig = plots.reliability_diagram(torch.softmax(logits, 1), targets, 10, path, dpi=50)
    assert isinstance(fig, Figure)
    assert png_size(path) == (250, 300)  # figsize (5, 6) x 50 dpi
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("outcome (ECE = ") for label in labels)
    ml = plots.reliability_diagram(
        torch.rand(20, 3), torch.randint(0, 2, (20, 3)), 5, task="multilabel"
    )
    assert ml.axes[0].get_ylabel() == "observed frequency"


def test_segmentation_overlay_colours_and_size(tmp_path):
    true, pred = disk(32, 14, 16, 8), disk(32, 18, 16, 8)
    entropy = torch.rand(32, 32)
    path = tmp_path / "overlay.png"
    fig = plots.segmentation_overlay(torch.randn(1, 32, 32), pred, true, entropy, path, dpi=40)
    assert png_size(path) == (480, 160)  # figsize (12, 4) x 40 dpi
    rgba = plots.overlay_colors(pred.numpy(), true.numpy())
    tp, fp, fn = (16, 16), (16, 24), (16, 7)  # (row, column): both, pred only, true only
    assert tuple(rgba[tp][:3]) == plots.TP_COLOR and rgba[tp][1] > 0  # green
    assert tuple(rgba[fp][:3]) == plots.FP_COLOR and rgba[fp][2] == 1  # blue
    assert tuple(rgba[fn][:3]) == plots.FN_COLOR and rgba[fn][0] == 1  # red
    assert rgba[0, 0, 3] == 0  # background transparent
    assert len(fig.axes) == 4  # three panels and the entropy colour bar


def test_segmentation_overlay_volume_and_errors(tmp_path):
    volume = np.random.default_rng(0).random((1, 16, 16, 5))
    mask = np.zeros((16, 16, 5), dtype=int)
    mask[4:10, 4:10, 2] = 1
    fig = plots.segmentation_overlay(volume, mask, mask, np.zeros((16, 16, 5)), dpi=20)
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="must have one shape"):
        plots.segmentation_overlay(volume[0, ..., 0], mask, mask[..., 0], mask[..., 0])


def test_r_bayes_sweep_png(tmp_path):
    results = [
        {
            "r_bayes": r,
            "dice": 0.8 - 0.1 * r,
            "dice_std": 0.01,
            "entropy": 0.01 + 0.3 * r,
            "flops": 3.4e12 * (1 + r),
        }
        for r in (0.8, 0.01, 0.05, 0.1, 0.2, 0.4)
    ]
    baselines = {"ensemble": {"dice": 0.79, "entropy": 0.02, "flops": 5e12}}
    path = tmp_path / "sweep.png"
    fig = plots.r_bayes_sweep(results, path, baselines=baselines, dpi=50)
    assert png_size(path) == (420, 180)  # two panels of 4.2 x 3.6 in, 50 dpi
    metric_axes = [ax for ax in fig.axes if ax.get_ylabel() in ("dice", "entropy")]
    assert [ax.get_title() for ax in metric_axes] == ["dice", "entropy"]
    assert any(ax.get_ylabel() == "FLOPs" for ax in fig.axes)
    x = metric_axes[0].lines[0].get_xdata()
    assert list(x) == pytest.approx([1, 5, 10, 20, 40, 80])  # sorted, in %
    one = plots.r_bayes_sweep(results, metrics=["dice"], figsize=(4, 3), dpi=25)
    assert len([ax for ax in one.axes if ax.get_ylabel() == "dice"]) == 1
    with pytest.raises(ValueError, match="at least one result"):
        plots.r_bayes_sweep([])
