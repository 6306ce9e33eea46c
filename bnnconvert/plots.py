"""Figures of the papers: reliability diagram, risk-coverage curve, segmentation overlay,
r_bayes sweep.

matplotlib is an optional extra (``pip install bnnconvert[plots]``), imported only when a
function is called. Figures are built on matplotlib's Agg canvas without pyplot, so no
global backend or figure registry is touched and nothing is ever shown; each function
returns the :class:`matplotlib.figure.Figure` and, when ``path`` is given, writes a PNG of
exactly ``figsize * dpi`` pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from .metrics import (
    ECE_BINS,
    Task,
    aurc,
    calibration_bins,
    confidence_and_correct,
    ece_from_bins,
    risk_coverage,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["r_bayes_sweep", "reliability_diagram", "risk_coverage_curve", "segmentation_overlay"]

TP_COLOR = (0.0, 0.8, 0.0)  # green
FP_COLOR = (0.0, 0.3, 1.0)  # blue
FN_COLOR = (1.0, 0.0, 0.0)  # red


def _figure(figsize: tuple[float, float], dpi: int) -> Figure:
    """A Figure on an Agg canvas (no pyplot); clear ImportError without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bnnconvert.plots needs matplotlib: pip install 'bnnconvert[plots]' "
            "(or pip install matplotlib)"
        ) from err
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=fig.dpi)
    return fig


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------- reliability
def reliability_diagram(
    probs: Tensor,
    targets: Tensor,
    n_bins: int = ECE_BINS,
    path: str | os.PathLike | None = None,
    *,
    task: Task = "multiclass",
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 6.0),
    dpi: int = 100,
) -> Figure:
    """Reliability diagram: accuracy vs confidence over ``n_bins`` equal-width bins
    (default :data:`~bnnconvert.metrics.ECE_BINS`, the bins of the ECE that
    :func:`bnnconvert.metrics.evaluate` reports).

    Top: per bin, the mean outcome (bars) against the diagonal of perfect calibration,
    the gap to the mean confidence shaded; the ECE (same bins) in the legend. Bottom: the
    share of items per bin. Bins and pairs as :func:`bnnconvert.metrics.calibration_bins`
    and :func:`~bnnconvert.metrics.confidence_and_correct` (top-label for multiclass,
    per label for multilabel).

    Args:
        probs: (N, C, *spatial) mean probabilities; targets: (N, *spatial) or
            (N, L, *spatial).
        path: write a PNG there.

    Returns the Figure.
    """
    conf, correct = confidence_and_correct(probs, targets, task=task)
    bins = calibration_bins(conf, correct, n_bins).cpu()
    count = bins[0].numpy()
    filled = count > 0
    safe = np.maximum(count, 1)
    mean_conf, mean_acc = bins[1].numpy() / safe, bins[2].numpy() / safe
    edges = np.linspace(0, 1, n_bins + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins

    fig = _figure(figsize, dpi)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ece = float(ece_from_bins(bins))
    top.bar(
        centers[filled],
        mean_acc[filled],
        width=width,
        edgecolor="black",
        color="tab:blue",
        label=f"outcome (ECE = {ece:.3f})",
    )
    gap_low = np.minimum(mean_acc, mean_conf)[filled]
    top.bar(
        centers[filled],
        np.abs(mean_conf - mean_acc)[filled],
        bottom=gap_low,
        width=width,
        color="tab:red",
        alpha=0.35,
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(
        xlim=(0, 1),
        ylim=(0, 1),
        ylabel="accuracy" if task == "multiclass" else "observed frequency",
        title=title or f"Reliability diagram ({n_bins} bins)",
    )
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(centers, count / max(count.sum(), 1), width=width, color="gray", edgecolor="black")
    bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="share")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------- risk-coverage
def risk_coverage_curve(
    probs: Tensor,
    targets: Tensor,
    path: str | os.PathLike | None = None,
    *,
    task: Task = "multiclass",
    confidence: Tensor | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 4.0),
    dpi: int = 100,
) -> Figure:
    """Risk-coverage curve of selective prediction: the error rate among the items kept
    when only the most confident fraction (the coverage) is kept, with the AURC
    (:func:`bnnconvert.metrics.aurc`, lower is better) in the legend and the error rate of
    every item (coverage 1) as a dotted line. Curve and area as
    :func:`bnnconvert.metrics.risk_coverage`.

    Args:
        probs: (N, C, *spatial) mean probabilities; targets: (N, *spatial) or
            (N, L, *spatial).
        confidence: the ranking score of the items (default: the top probability), e.g.
            ``-prediction.entropy``.
        path: write a PNG there.

    Returns the Figure.
    """
    coverage, risk = risk_coverage(probs, targets, task=task, confidence=confidence)
    if len(risk) == 0:
        raise ValueError("risk_coverage_curve needs at least one item, got none")
    area = float(aurc(probs, targets, task=task, confidence=confidence))
    fig = _figure(figsize, dpi)
    ax = fig.subplots()
    ax.plot(_numpy(coverage), _numpy(risk), color="tab:blue", label=f"AURC = {area:.4f}")
    full = float(risk[-1])
    ax.axhline(full, color="gray", linestyle=":", label=f"error rate, all kept ({full:.3f})")
    ax.set(
        xlim=(0, 1),
        ylim=(0, max(1e-3, 1.2 * float(risk.max()))),
        xlabel="coverage (fraction kept, most confident first)",
        ylabel="risk (error rate among kept)",
        title=title or "Risk-coverage curve",
    )
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------- overlay
def _slice2d(x: np.ndarray, slice_index: int | None, spatial: int) -> np.ndarray:
    """The ``slice_index`` slice (default the middle) of the last axis of a 3D array with
    ``spatial`` = 3, else ``x`` unchanged."""
    if spatial != 3:
        return x
    index = x.shape[-1] // 2 if slice_index is None else slice_index
    return x[..., index]


def _image_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (1|3, H, W) or (H, W, 1|3) -> (H, W) grey or (H, W, 3), scaled to [0, 1]."""
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    image = image.astype(np.float64)
    low, high = np.nanmin(image), np.nanmax(image)
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def overlay_colors(pred_mask: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4) of a prediction against the truth (foreground = nonzero):
    true positive green, false positive blue, false negative red, elsewhere transparent."""
    pred, true = pred_mask != 0, true_mask != 0
    rgba = np.zeros((*pred.shape, 4))
    for mask, color in (
        (pred & true, TP_COLOR),
        (pred & ~true, FP_COLOR),
        (~pred & true, FN_COLOR),
    ):
        rgba[mask] = (*color, 1.0)
    return rgba


def segmentation_overlay(
    image: Tensor | np.ndarray,
    pred_mask: Tensor | np.ndarray,
    true_mask: Tensor | np.ndarray,
    entropy: Tensor | np.ndarray,
    path: str | os.PathLike | None = None,
    *,
    slice_index: int | None = None,
    alpha: float = 0.6,
    title: str | None = None,
    figsize: tuple[float, float] = (12.0, 4.0),
    dpi: int = 100,
) -> Figure:
    """The paper's Figure 3 for one image: input, mask overlay, entropy map.

    The overlay colours true positives green, false positives blue and false negatives
    red over the image (foreground = nonzero label; multi-class masks are compared as
    foreground vs background). The entropy map (high red, low blue) has a colour bar.

    Args:
        image: (H, W), (C, H, W) or (H, W, C) with C in {1, 3}; a volume (H, W, D) or
            (1, H, W, D) is shown at ``slice_index`` of its last axis (default middle).
        pred_mask, true_mask: (H, W) or (H, W, D) label maps (e.g. ``probs.argmax(0)``).
        entropy: (H, W) or (H, W, D), e.g. ``prediction.entropy[i]``.
        path: write a PNG there.

    Returns the Figure.
    """
    pred, true, ent = (_numpy(a) for a in (pred_mask, true_mask, entropy))
    if not pred.shape == true.shape == ent.shape:
        raise ValueError(
            f"pred_mask {pred.shape}, true_mask {true.shape} and entropy {ent.shape} must "
            "have one shape, (H, W) or (H, W, D)"
        )
    spatial = pred.ndim
    img = _numpy(image)
    if spatial == 3 and img.ndim == 4:
        img = img[0]
    pred, true, ent, img = (_slice2d(a, slice_index, spatial) for a in (pred, true, ent, img))
    img = _image_rgb(img)
    if img.shape[:2] != pred.shape:
        raise ValueError(f"image {img.shape[:2]} and masks {pred.shape} differ in size")

    fig = _figure(figsize, dpi)
    axes = fig.subplots(1, 3)
    cmap = "gray" if img.ndim == 2 else None
    axes[0].imshow(img, cmap=cmap)
    axes[0].set_title("input")
    axes[1].imshow(img, cmap=cmap)
    axes[1].imshow(overlay_colors(pred, true), alpha=alpha)
    axes[1].set_title("prediction: TP green, FP blue, FN red")
    shown = axes[2].imshow(ent, cmap="jet", vmin=0)
    axes[2].set_title("entropy")
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------- sweep
def _series(results: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r.get(key, math.nan)) for r in results])


def r_bayes_sweep(
    results: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    flops_key: str = "flops",
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Figure:
    """The paper's Figure 4: each metric against r_bayes, with the FLOPs on a second axis.

    Args:
        results: one mapping per r_bayes value, e.g. ``{"r_bayes": 0.01, "dice": 0.8,
            "entropy": 0.01, "flops": 3.4e12}``; the keys of :func:`bnnconvert.metrics.evaluate`
            work as metric names; an optional ``"<metric>_std"`` gives error bars.
            r_bayes is a fraction in (0, 1], shown in % on a log axis.
        metrics: the metrics to plot, one panel each (default: every numeric key other
            than r_bayes, the FLOPs and the *_std keys).
        baselines: {name: {metric: value, flops_key: value}} drawn as horizontal lines,
            e.g. the deterministic model, a 5-member ensemble, the fully Bayesian model;
            their FLOPs are given in the legend.
        flops_key: the key of the FLOPs in ``results`` (dashed grey line, right axis).
        path: write a PNG there.

    Returns the Figure.
    """
    if not results:
        raise ValueError("r_bayes_sweep needs at least one result")
    rows = sorted(results, key=lambda r: float(r["r_bayes"]))
    if metrics is None:
        skip = {"r_bayes", flops_key}
        metrics = [
            k
            for k, v in rows[0].items()
            if k not in skip and not k.endswith("_std") and isinstance(v, (int, float))
        ]
    if not metrics:
        raise ValueError("no metric to plot: pass metrics=[...] or add metric keys to results")
    size = figsize or (4.2 * len(metrics), 3.6)
    fig = _figure(size, dpi)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)[0])
    percent = 100 * _series(rows, "r_bayes")
    flops = _series(rows, flops_key)
    for ax, metric in zip(axes, metrics):
        _sweep_panel(ax, percent, _series(rows, metric), _series(rows, f"{metric}_std"), metric)
        for i, (name, values) in enumerate((baselines or {}).items()):
            label = name
            if flops_key in values:
                label += f" ({float(values[flops_key]):.3g} FLOPs)"
            if metric in values:
                ax.axhline(float(values[metric]), color=f"C{i + 1}", linestyle=":", label=label)
        handles, labels = ax.get_legend_handles_labels()
        if np.isfinite(flops).any():
            twin = _flops_axis(ax, percent, flops)
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, fontsize="x-small", loc="best")
    fig.tight_layout()
    return _save(fig, path)


def _flops_axis(ax: Any, percent: np.ndarray, flops: np.ndarray) -> Any:
    """A right axis with the FLOPs per r_bayes, drawn under the metric's curve."""
    twin = ax.twinx()
    twin.plot(
        percent,
        flops,
        color="gray",
        linestyle="--",
        marker="s",
        markersize=3,
        alpha=0.7,
        label="FLOPs (right axis)",
    )
    twin.set_ylabel("FLOPs", color="gray")
    twin.tick_params(axis="y", colors="gray")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    return twin


def _sweep_panel(
    ax: Any, percent: np.ndarray, values: np.ndarray, std: np.ndarray, name: str
) -> None:
    errors = std if np.isfinite(std).any() else None
    ax.errorbar(
        percent, values, yerr=errors, marker="o", capsize=3, color="C0", label="partial Bayesian"
    )
    ax.set_xscale("log")
    ax.set_xticks(percent)
    ax.set_xticklabels([f"{p:g}" for p in percent])
    ax.minorticks_off()
    ax.set(xlabel="r_bayes (%)", ylabel=name, title=name)
