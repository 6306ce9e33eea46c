"""Per-case predictions and uncertainty maps, written to a folder batch by batch.

:func:`predict_cases` runs the Monte Carlo prediction of :mod:`bnnconvert.predict` one
batch at a time and writes, for every item (a *case*), the prediction and how much to
trust it, so that a test set of 3-D volumes is never held in memory: only the current
batch's S samples exist at any time (and the per-case table). The folder it fills::

    cases.csv     one row per case, in the data's order (columns below)
    cases.npz     classification: the arrays, index (N,), probs (N, C), prediction,
                  entropy, expected_entropy, mutual_info, variance (N, C), targets,
                  samples (S, N, C) with keep_samples
    cases/<id>/   segmentation, one folder per case: probs.npy (C, *spatial),
                  mask.npy (*spatial), entropy.npy, expected_entropy.npy,
                  mutual_info.npy (*spatial), variance.npy (C, *spatial), overlay.png,
                  samples.npy (S, C, *spatial) with keep_samples, and probs / mask /
                  entropy / mutual_info ``.nii.gz`` when the case's input was a NIfTI file
    flagged.csv   with flag_top: the most uncertain cases (referral), most uncertain first
    run.json      the settings and the list of files, written last (a finished run)

Columns of ``cases.csv`` (segmentation: each per-pixel value averaged over the pixels;
"sigmoid" outputs: averaged over the labels too):

- ``index`` (position in the data's order), ``id`` (the dataset's ``ids`` when the data
  is read in order, else the index);
- ``prediction``: the class (softmax), the positive labels separated by spaces (sigmoid);
  segmentation: ``prediction_foreground``, the fraction of pixels predicted non-zero;
- ``confidence``: the predicted outcome's mean probability, max_c p_c (softmax) or
  max(p, 1 - p) (sigmoid);
- ``entropy``, ``expected_entropy``, ``mutual_info``: the uncertainty decomposition of
  :class:`~bnnconvert.predict.Prediction`, in nats;
- ``variance``: the variance over the S draws of the predicted outcome's probability;
- with targets: ``target`` (classification), ``target_foreground`` and ``dice`` (the
  foreground Dice of the case, :func:`bnnconvert.metrics.dice`) for segmentation;
- segmentation: ``maps``, the case's folder relative to the output folder.

The files are written into a hidden sibling folder that is moved into place when the run
completes (:func:`bnnconvert._utils.staged_folder`): a run that fails leaves the output
folder as it was (missing, empty, or an earlier run's files with ``overwrite``). The PNG
overlays need matplotlib (the ``plots`` extra) and the NIfTI maps nibabel (the ``nifti``
extra): without them those files are skipped with a warning. :mod:`bnnconvert.data` reads
no NIfTI file itself: NIfTI maps are written when a dataset read in order names its inputs
in ``image_paths`` (as :class:`~bnnconvert.datasets.SegmentationFolderDataset` does) and a
case's path ends in ``.nii`` or ``.nii.gz``; its affine and header are copied and the
maps' spatial axes are taken to be the file's voxel axes.
"""

from __future__ import annotations

import csv
import gc
import gzip
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import SequentialSampler
from tqdm.auto import tqdm

from . import plots
from ._utils import (
    BatchFormat,
    Inputs,
    atomic_write_bytes,
    atomic_write_text,
    check_output_folder,
    check_positive_int,
    model_device,
    split_batch,
    staged_folder,
)
from ._version import __version__
from .losses import TASKS, data_task
from .metrics import dice
from .predict import Prediction, predict_batches, prediction_samples

__all__ = ["CASES_FORMAT", "CaseReport", "check_cases_folder", "predict_cases"]

CASES_FORMAT = "bnnconvert.cases"
"""The ``format`` of a finished run's ``run.json``."""
CASES_VERSION = 1
TABLE, ARRAYS, FLAGGED, MANIFEST, CASES_DIR = (
    "cases.csv",
    "cases.npz",
    "flagged.csv",
    "run.json",
    "cases",
)
NIFTI_MAPS = ("probs", "mask", "entropy", "mutual_info")
_CASE_FILES = frozenset(
    [f"{name}.npy" for name in ("probs", "mask", "entropy", "expected_entropy")]
    + ["mutual_info.npy", "variance.npy", "samples.npy", "overlay.png"]
    + [f"{name}.nii.gz" for name in NIFTI_MAPS]
)
"""Every file name a case folder may hold (what ``overwrite=True`` removes)."""
_UNCERTAINTY = ("confidence", "entropy", "expected_entropy", "mutual_info", "variance")
_COLUMNS = (
    "rank",
    "index",
    "id",
    "prediction",
    "prediction_foreground",
    *_UNCERTAINTY,
    "target",
    "target_foreground",
    "dice",
    "maps",
)
"""The order of the table's columns."""


@dataclass
class CaseReport:
    """What :func:`predict_cases` wrote.

    Attributes:
        folder: the output folder.
        task, activation: how the outputs were read.
        samples: S, the Monte Carlo samples drawn (1 for a model without Bayesian layers).
        ids: the case ids, in the data's order (N,).
        entropy: float64 (N,), each case's predictive entropy (segmentation: its mean
            over the pixels; sigmoid: over the labels), the score of ``flagged``.
        flagged: the indices of the flagged cases, most uncertain first (empty without
            ``flag_top``).
        files: every file written, ``run.json`` last.
    """

    folder: Path
    task: str
    activation: str
    samples: int
    ids: list[str]
    entropy: np.ndarray
    flagged: list[int]
    files: list[Path]

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> str:
        """A few lines for a terminal: cases, files, the flagged cases."""
        lines = [
            f"{len(self)} cases ({self.task}, S = {self.samples}): {len(self.files)} files "
            f"in {self.folder}",
            f"  mean predictive entropy {float(self.entropy.mean()):.4f} nats",
        ]
        if self.flagged:
            shown = ", ".join(self.ids[i] for i in self.flagged[:5])
            more = ", ..." if len(self.flagged) > 5 else ""
            lines.append(f"  flagged for review ({len(self.flagged)}): {shown}{more}")
        return "\n".join(lines)


# --------------------------------------------------------------------- the output folder
def check_cases_folder(folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """``folder`` as a Path, checked before any work: it must be writable and empty
    (ValueError naming ``overwrite=True`` otherwise), unless ``overwrite``."""
    folder = check_output_folder(folder)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if found and not overwrite:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"output folder {folder} is not empty (it holds {shown}); choose a new folder, "
            "or pass overwrite=True to replace the files of an earlier run"
        )
    return folder


def _clear_previous(folder: Path) -> None:
    """Remove the files an earlier run may have left in ``folder`` (the layout's names
    only: other files stay), and the case folders this empties."""
    for name in (TABLE, ARRAYS, FLAGGED, MANIFEST):
        (folder / name).unlink(missing_ok=True)
    cases = folder / CASES_DIR
    if not cases.is_dir():
        return
    for case in cases.iterdir():
        if case.is_dir():
            for path in case.iterdir():
                if path.name in _CASE_FILES:
                    path.unlink()
            if not any(case.iterdir()):
                case.rmdir()
    if not any(cases.iterdir()):
        cases.rmdir()


def _write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _csv_text(rows: list[dict[str, Any]]) -> str:
    found = dict.fromkeys(key for row in rows for key in row)
    columns = [c for c in _COLUMNS if c in found] + [c for c in found if c not in _COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------- per-entry values
def _per_entry(prediction: Prediction) -> dict[str, Tensor]:
    """The predicted label and the uncertainty of each entry of a batch: shape
    (B, *spatial) for "softmax", (B, C, *spatial) for "sigmoid"."""
    probs, variance = prediction.probs, prediction.variance
    if prediction.activation == "softmax":
        confidence, label = probs.max(1)
        variance = variance.gather(1, label.unsqueeze(1)).squeeze(1)
    else:
        label = (probs > 0.5).long()
        confidence = torch.maximum(probs, 1 - probs)
    return {
        "prediction": label,
        "confidence": confidence,
        "entropy": prediction.entropy,
        "expected_entropy": prediction.expected_entropy,
        "mutual_info": prediction.mutual_info,
        "variance": variance,
    }


def _case_means(entries: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Each uncertainty value averaged over an item's entries: float64 (B,)."""
    return {
        k: entries[k].double().reshape(len(entries[k]), -1).mean(1).numpy() for k in _UNCERTAINTY
    }


def _labels_text(row: Tensor) -> str:
    """Multi-label values (L,) as the indices of the positive labels: "0 3"."""
    return " ".join(str(i) for i in row.nonzero().flatten().tolist())


# --------------------------------------------------------------------- the writer
@dataclass
class _Writer:
    """The state of one run: the folder, the rows so far, the files written."""

    folder: Path
    task: str | None
    activation: str
    ids: list | None
    sources: list | None
    overlays: bool = True
    nifti: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    arrays: dict[str, list[Tensor]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    names: set[str] = field(default_factory=set)

    def add(self, x: Inputs, prediction: Prediction) -> None:
        """Write the cases of one batch: inputs x (B, ...) (keyword inputs: a mapping),
        their prediction."""
        if self.task is None:  # neither given nor declared by the data: from the outputs
            segmentation = prediction.probs.ndim > 2
            multilabel = self.activation == "sigmoid"
            self.task = (
                "segmentation" if segmentation else "multilabel" if multilabel else "multiclass"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = _per_entry(prediction)
        means = _case_means(entries)
        start = len(self.rows)
        rows = [
            self._row(start + j, {k: float(v[j]) for k, v in means.items()})
            for j in range(len(prediction))
        ]
        if self.task == "segmentation":
            self._segmentation(x, prediction, entries, rows)
        else:
            self._classification(prediction, entries, rows)
        self.rows.extend(rows)
        self.scores.extend(means["entropy"].tolist())

    def _row(self, index: int, values: dict[str, float]) -> dict[str, Any]:
        case = (
            str(self.ids[index]) if self.ids is not None and index < len(self.ids) else str(index)
        )
        return {"index": index, "id": case, **values}

    # ------------------------------------------------------------- classification
    def _classification(
        self, prediction: Prediction, entries: dict[str, Tensor], rows: list[dict]
    ) -> None:
        label, targets = entries["prediction"], prediction.targets
        for j, row in enumerate(rows):
            text = _labels_text(label[j]) if label.ndim > 1 else int(label[j])
            row["prediction"] = text
            if targets is not None:
                row["target"] = _labels_text(targets[j]) if targets.ndim > 1 else int(targets[j])
        values = {
            "probs": prediction.probs,
            "prediction": label,
            "entropy": prediction.entropy,
            "expected_entropy": prediction.expected_entropy,
            "mutual_info": prediction.mutual_info,
            "variance": prediction.variance,
            "targets": prediction.targets,
            "samples": prediction.samples,
        }
        for name, value in values.items():
            if value is not None:
                self.arrays.setdefault(name, []).append(value)

    # ------------------------------------------------------------- segmentation
    def _segmentation(
        self, x: Inputs, prediction: Prediction, entries: dict[str, Tensor], rows: list[dict]
    ) -> None:
        targets, label = prediction.targets, entries["prediction"]
        overlays = self.overlays and isinstance(x, Tensor)  # not for keyword inputs
        foreground = (label != 0).double().flatten(1).mean(1)
        if targets is not None:
            case_dice = dice(prediction.probs, targets, per_image=True)
            target_foreground = (targets != 0).double().flatten(1).mean(1)
        for j, row in enumerate(rows):
            row["prediction_foreground"] = float(foreground[j])
            if targets is not None:
                row["target_foreground"] = float(target_foreground[j])
                row["dice"] = float(case_dice[j])
            folder = self.folder / CASES_DIR / self._case_name(row)
            folder.mkdir(parents=True, exist_ok=True)
            row["maps"] = folder.relative_to(self.folder).as_posix()
            target = None if targets is None else targets[j]
            self._maps(folder, prediction, label[j], j)
            if overlays and self.overlays:
                self._overlay(folder, x[j], label[j], target, prediction.entropy[j], row["id"])
            if self.nifti and self.sources is not None and row["index"] < len(self.sources):
                self._nifti(folder, Path(self.sources[row["index"]]), prediction, label[j], j)
        if overlays:  # matplotlib figures are reference cycles: free their buffers
            gc.collect()  # now, not at the next full collection (bounded memory)

    def _case_name(self, row: dict[str, Any]) -> str:
        """A file-system-safe, unused folder name for the case."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", row["id"]).lstrip(".") or str(row["index"])
        if name in self.names:
            name = f"{name}_{row['index']}"
        self.names.add(name)
        return name

    def _maps(self, folder: Path, prediction: Prediction, label: Tensor, j: int) -> None:
        maps = {
            "probs": prediction.probs[j].float().numpy(),
            "mask": label.numpy().astype(np.uint8 if int(label.max()) < 256 else np.int64),
            "entropy": prediction.entropy[j].float().numpy(),
            "expected_entropy": prediction.expected_entropy[j].float().numpy(),
            "mutual_info": prediction.mutual_info[j].float().numpy(),
            "variance": prediction.variance[j].float().numpy(),
        }
        if prediction.samples is not None:
            maps["samples"] = prediction.samples[:, j].float().numpy()
        for name, array in maps.items():
            self._emit(folder / f"{name}.npy", lambda p, a=array: _write_npy(p, a))

    def _overlay(
        self,
        folder: Path,
        image: Tensor,
        label: Tensor,
        target: Tensor | None,
        entropy: Tensor,
        case: str,
    ) -> None:
        """overlay.png: the input, the prediction against the target (the prediction
        alone, all green, without one) and the entropy map (channels averaged)."""
        if self.activation == "sigmoid":  # (C, *spatial): any label, the mean entropy
            label, entropy = label.amax(0), entropy.mean(0)
            target = target[0] if target is not None and len(target) == 1 else target
        if target is None or target.shape != label.shape:
            target, note = label, " (no ground truth: prediction in green)"
        else:
            note = ""
        try:
            fig = plots.segmentation_overlay(image, label, target, entropy, title=f"{case}{note}")
        except ImportError as exc:
            warnings.warn(f"{exc}; overlay.png is not written", stacklevel=4)
            self.overlays = False
            return
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=fig.dpi)
        self._emit(folder / "overlay.png", lambda p: atomic_write_bytes(p, buffer.getvalue()))

    def _nifti(
        self, folder: Path, source: Path, prediction: Prediction, label: Tensor, j: int
    ) -> None:
        """The NIfTI maps of a case whose input was a NIfTI file (its affine and header)."""
        if not source.name.endswith((".nii", ".nii.gz")):
            return
        try:
            import nibabel  # optional: pip install 'bnnconvert[nifti]'
        except ImportError:
            warnings.warn(
                "the inputs are NIfTI files but nibabel is not installed, so no .nii.gz "
                "map is written; pip install 'bnnconvert[nifti]'",
                stacklevel=4,
            )
            self.nifti = False
            return
        reference = nibabel.load(source)
        spatial = tuple(prediction.probs.shape[2:])
        if tuple(reference.shape[: len(spatial)]) != spatial:
            warnings.warn(
                f"{source} has shape {reference.shape} but the maps are {spatial}: no .nii.gz "
                "map is written (the maps' spatial axes must be the file's voxel axes)",
                stacklevel=4,
            )
            self.nifti = False
            return
        maps = {
            "probs": prediction.probs[j].float(),
            "mask": label.to(torch.uint8 if int(label.max()) < 256 else torch.int32),
            "entropy": prediction.entropy[j].float(),
            "mutual_info": prediction.mutual_info[j].float(),
        }
        for name, value in maps.items():
            channels = name == "probs" or self.activation == "sigmoid"  # (C, *spatial)
            array = np.moveaxis(value.numpy(), 0, -1) if channels else value.numpy()
            image = nibabel.Nifti1Image(array, reference.affine, reference.header)
            image.set_data_dtype(array.dtype)
            data = gzip.compress(image.to_bytes(), mtime=0)
            self._emit(folder / f"{name}.nii.gz", lambda p, d=data: atomic_write_bytes(p, d))

    def _emit(self, path: Path, write) -> None:
        write(path)
        self.files.append(path)

    # ------------------------------------------------------------- the end
    def finish(self, flag_top: float | None, samples: int, seed: int | None) -> CaseReport:
        """Write the table, the arrays, the flagged cases and run.json."""
        if not self.rows:
            raise ValueError("the data yielded no batch: there is no case to predict")
        self._emit(self.folder / TABLE, lambda p: atomic_write_text(p, _csv_text(self.rows)))
        if self.arrays:
            self._emit(self.folder / ARRAYS, self._write_arrays)
        scores = np.asarray(self.scores, dtype=np.float64)
        flagged: list[int] = []
        if flag_top is not None:
            count = math.ceil(flag_top * len(scores))
            flagged = np.argsort(-scores, kind="stable")[:count].tolist()
            ranked = [{"rank": r + 1, **self.rows[i]} for r, i in enumerate(flagged)]
            self._emit(self.folder / FLAGGED, lambda p: atomic_write_text(p, _csv_text(ranked)))
        manifest = {
            "format": CASES_FORMAT,
            "version": CASES_VERSION,
            "bnnconvert_version": __version__,
            "task": self.task,
            "activation": self.activation,
            "samples": samples,
            "seed": seed,
            "cases": len(self.rows),
            "flag_top": flag_top,
            "flagged": len(flagged),
            "files": [p.relative_to(self.folder).as_posix() for p in self.files],
        }
        text = json.dumps(manifest, indent=2) + "\n"
        self._emit(self.folder / MANIFEST, lambda p: atomic_write_text(p, text))
        return CaseReport(
            folder=self.folder,
            task=str(self.task),
            activation=self.activation,
            samples=samples,
            ids=[row["id"] for row in self.rows],
            entropy=scores,
            flagged=flagged,
            files=list(self.files),
        )

    def _write_arrays(self, path: Path) -> None:
        arrays = {
            name: torch.cat(parts, dim=1 if name == "samples" else 0).numpy()
            for name, parts in self.arrays.items()
        }
        arrays["index"] = np.arange(len(self.rows))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------- predict_cases
def _in_order(data: Iterable, name: str) -> list | None:
    """``data.dataset.<name>`` (ids, image_paths) when a DataLoader reads it in order."""
    if not isinstance(getattr(data, "sampler", None), SequentialSampler):
        return None
    values = getattr(getattr(data, "dataset", None), name, None)
    return list(values) if isinstance(values, (list, tuple)) else None


@contextmanager
def _seeded(seed: int | None, model: nn.Module) -> Iterator[None]:
    """Within the block, torch's RNG (and the model's CUDA device's) starts from ``seed``;
    the global state is restored afterwards. None: the global RNG as it is."""
    if seed is None:
        yield
        return
    device = model_device(model)
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_arguments(data: Any, task: str | None, activation: str | None, flag_top: Any) -> None:
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of batches (a DataLoader), got {type(data).__name__}; "
            "for one tensor x of inputs pass [x] or x.split(batch_size)"
        )
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if activation not in (None, "softmax", "sigmoid"):
        raise ValueError(
            f"activation must be 'softmax' or 'sigmoid' (per-case uncertainty needs "
            f"probabilities), got {activation!r}"
        )
    if flag_top is None:
        return
    if isinstance(flag_top, bool) or not isinstance(flag_top, (int, float)):
        raise TypeError(f"flag_top must be a fraction in (0, 1], got {flag_top!r}")
    if not 0 < flag_top <= 1:
        raise ValueError(f"flag_top must be a fraction in (0, 1], e.g. 0.05, got {flag_top!r}")


def predict_cases(
    model: nn.Module,
    data: Iterable,
    out_dir: str | os.PathLike,
    *,
    samples: int | None = None,
    task: str | None = None,
    activation: str | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    flag_top: float | None = None,
    keep_samples: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    batch_format: BatchFormat | None = None,
) -> CaseReport:
    """Predict every case of ``data`` with ``samples`` Monte Carlo samples and write the
    per-case table, arrays and maps to ``out_dir`` (layout in the module docstring).

    Streams: each batch goes through :func:`bnnconvert.predict.predict_batches` and is
    written before the next is read, so memory holds one batch's S samples
    (S, B, C, *spatial), never the whole set's. The values equal those of
    :func:`bnnconvert.predict` on the same batches after ``torch.manual_seed(seed)``.

    Args:
        model: a converted model (or any model; one without Bayesian layers is run once,
            as its S samples would be identical).
        data: an iterable of batches, tensors or (input, target) pairs: a DataLoader.
            Read in order (a SequentialSampler), its dataset's ``ids`` name the cases and
            its ``image_paths`` give the NIfTI reference of each case.
        out_dir: the output folder; created if missing. It must be empty unless
            ``overwrite``. It is filled only when the run completes: a run that raises
            leaves it as it was.
        samples: S, the posterior samples per case (None: the S the model was calibrated
            with, else 5).
        task: "multiclass", "multilabel" or "segmentation"; default the data's
            (``data.dataset.task``), else segmentation for outputs with spatial
            dimensions (N, C, H, W[, D]), else classification.
        activation: "softmax" or "sigmoid"; default "sigmoid" for "multilabel", else
            "softmax".
        seed: seeds torch's RNG for the draws (the global RNG state is left as it was);
            None draws from the global RNG.
        device: where batches are sent (default: the model's device).
        flag_top: a fraction in (0, 1]: list the ceil(flag_top * N) cases of highest
            predictive entropy in ``flagged.csv`` (referral; ties by index).
        keep_samples: also write the per-sample probabilities (``samples`` in
            ``cases.npz``; ``samples.npy`` per segmentation case).
        overwrite: replace the files of an earlier run in ``out_dir`` once this run
            completes (only the layout's file names are removed; other files stay).
        progress: a tqdm bar over the batches.
        batch_format: how to read mapping batches and structured outputs
            (:class:`bnnconvert._utils.BatchFormat`); no PNG overlay is drawn for keyword
            inputs.

    Returns a :class:`CaseReport`. Raises ValueError for bad values (an output folder
    that is not empty without ``overwrite``, ``flag_top`` outside (0, 1], no batch),
    TypeError for data that is not an iterable of batches.
    """
    samples = prediction_samples(model, samples)
    check_positive_int(samples=samples)
    _check_arguments(data, task, activation, flag_top)
    task = task or data_task(data)
    activation = activation or ("sigmoid" if task == "multilabel" else "softmax")
    folder = check_cases_folder(out_dir, overwrite)
    ids, sources = _in_order(data, "ids"), _in_order(data, "image_paths")
    total = len(data) if hasattr(data, "__len__") else None
    with staged_folder(folder, last=[MANIFEST]) as staging:
        writer = _Writer(staging, task, activation, ids=ids, sources=sources)
        with _seeded(seed, model):
            for batch in tqdm(
                data, desc="predict", unit="batch", total=total, disable=not progress
            ):
                x, _ = split_batch(batch, batch_format=batch_format)
                (prediction,) = predict_batches(
                    model,
                    [batch],
                    samples,
                    activation=activation,
                    keep_samples=keep_samples,
                    device=device,
                    output_device="cpu",
                    progress=False,
                    batch_format=batch_format,
                )
                writer.add(x, prediction)
        report = writer.finish(flag_top, samples, seed)
        if overwrite and folder.is_dir():
            _clear_previous(folder)  # the earlier run's files go once this run is complete
    return _moved(report, staging, folder)


def _moved(report: CaseReport, staging: Path, folder: Path) -> CaseReport:
    """``report`` with the paths of the staged files replaced by their final ones."""
    files = [folder / path.relative_to(staging) for path in report.files]
    return replace(report, folder=folder, files=files)
