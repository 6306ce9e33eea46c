"""Compare methods on the user's model and data: one protocol, one evaluation, one report.

The protocol of the paper (Table 1 of the preprint):

1. Step 1 trains a deterministic model (``pretrain_epochs`` epochs of plain NLL), or the
   user passes one already trained.
2. Every method then gets the same extra budget of ``epochs`` epochs starting from that
   trained model: the deterministic baseline trains on with the NLL (temperature
   scaling adds an LBFGS fit on ``val_data``), the variational methods (partialP,
   magnitudeP, randomP, last_layer, bayesian, bayesian_torch) are converted from it and
   fine-tuned with the ELBO (the grad2/fisher ones after one saliency pass over the
   training data), MC dropout fine-tunes with dropout inserted, the checkpoint
   ensembles and SWA run their learning-rate schedule over the ``epochs`` epochs
   (T = epochs), layer ensembles train network and heads jointly, last-layer Laplace
   (laplace_ll, laplace_ll_diag) trains on like the deterministic baseline and then fits
   its posterior with one pass over the training data.
3. The exception is the deep ensemble: each of its M members is re-initialised and
   trained from scratch for ``pretrain_epochs + epochs`` epochs, the whole budget of the
   deterministic pipeline (M times that in all).

Every method is then evaluated by :func:`bnnconvert.metrics.evaluate` on the
:class:`~bnnconvert.Prediction` its ``predict`` returns, and, with ``ood_data``, by the
AUROC of separating test from out-of-distribution inputs with the entropy of the
expected prediction (per image: mean over pixels or labels).

Training FLOPs count the whole pipeline of each method (the shared pretraining
included, except for the ensemble which does not use it), as multiples of the
deterministic pipeline (pretraining + ``epochs`` epochs); inference FLOPs are one
prediction as ``predict`` runs it (the layers before the first stochastic one once, the
rest S times; M members, K checkpoints) over one deterministic forward.

:func:`evaluate_methods` returns one row (a dict) per method; :func:`run_comparison` runs
it on the requested methods plus the r_bayes sweep of the paper (partial 1, 5, 10, 20,
40, 80 %) and returns a :class:`ComparisonReport`, which renders the markdown table
(:func:`results_markdown`) and the sweep figure (:func:`bnnconvert.plots.r_bayes_sweep`)
and writes them to a folder (what ``bnnconvert benchmark`` does)::

    report = run_comparison(model, train_loader, test_loader, task="multiclass",
                            methods="deterministic,ensemble5,partial1", epochs=2)
    report.write("comparison/")   # results.md, results.json, r_bayes_sweep.png
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._utils import (
    BatchFormat,
    atomic_write_bytes,
    check_output_folder,
    json_safe,
    split_batch,
)
from ..flops import count_flops, training_cost
from ..metrics import entropy_auroc, evaluate, image_uncertainty, item_nll
from ..paired import PairedDifference, paired_difference
from ..plots import r_bayes_sweep
from ..predict import Prediction
from ..saliency import check_r_bayes
from ..training import TrainSettings, seed_everything, train
from .base import Method, reseed_data
from .ensemble import Ensemble
from .full_bayes import FullBayes
from .laplace_last_layer import LaplaceLastLayer
from .registry import check_method_names, get_method

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_METHODS",
    "REPORT_FILES",
    "SWEEP_R_BAYES",
    "ComparisonReport",
    "compare_methods_on_data",
    "evaluate_methods",
    "ood_auroc",
    "paired_differences",
    "paired_markdown",
    "per_item_values",
    "results_markdown",
    "run_comparison",
    "sweep_method_names",
    "without_items",
]

log = logging.getLogger(__name__)

DEFAULT_METHODS = "deterministic,ensemble5,partial1,partial5,partial20,bayesian"
"""The methods of the paper's Table 1 (the default of :func:`run_comparison`)."""

SWEEP_R_BAYES = (0.01, 0.05, 0.10, 0.20, 0.40, 0.80)
"""The r_bayes values of the paper's sweep (its Figure 4)."""

REPORT_FILES = {"table": "results.md", "json": "results.json", "sweep": "r_bayes_sweep.png"}
"""The files :meth:`ComparisonReport.write` writes into its folder."""


def evaluate_methods(
    model: nn.Module | Callable[[], nn.Module],
    train_data: Iterable,
    test_data: Iterable,
    *,
    task: str,
    methods: Sequence[str] | str = ("deterministic", "ensemble5", "partial1"),
    epochs: int = 2,
    pretrain_epochs: int | None = None,
    samples: int = 5,
    seed: int = 0,
    ood_data: Iterable | None = None,
    val_data: Iterable | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    settings: TrainSettings | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    flops: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train, predict and evaluate each method of ``methods``; one dict per method.

    Args:
        model: a trained model (step 1 done), or a function returning a fresh untrained
            one (then step 1 trains it for ``pretrain_epochs`` epochs with ``seed``).
        train_data: (input, target) batches, e.g. :func:`bnnconvert.data.make_loader`
            (its generator is reseeded with ``seed`` by every fit, so each method sees
            the same data order), or mapping batches read by the
            :class:`~bnnconvert.BatchFormat` of ``train_kwargs["batch_format"]`` (the
            fits, predictions and FLOP counts all read the data with it).
        test_data: batches for the metrics, read like ``train_data``.
        task: "multiclass", "multilabel" or "segmentation".
        methods: names for :func:`~bnnconvert.methods.get_method`, a list or a
            comma-separated string ("deterministic,ensemble5,partial1").
        epochs: E, the extra budget of every method (see the module docstring).
        pretrain_epochs: P, epochs of step 1 (default E); with a trained model it only
            states how long that model was trained, for the ensemble's budget (P + E
            epochs per member) and the FLOP accounting.
        samples: S, posterior samples at training and test time (the paper: 5).
        seed: seeds step 1 and every method's fit.
        ood_data: out-of-distribution inputs (tensors or (input, target) batches) for
            the OOD AUROC.
        val_data: validation batches (temperature scaling needs them).
        method_kwargs: {method name: constructor keyword arguments} (e.g.
            ``{"mc_dropout": {"p": 0.2}}``).
        settings: how every fit trains (:class:`~bnnconvert.training.TrainSettings`;
            the variational methods use their own beta and S).
        train_kwargs: other keyword arguments of every fit (``class_weights``,
            ``device``, ``batch_format``, ...; see :meth:`Method.fit`).
        flops: count the FLOPs with fvcore (False saves the time of tracing).
        progress: a progress bar over the methods (tqdm).

    Returns a list of dicts, one per method, with keys "method", "task", "epochs" (its
    budget), "train_steps", "fit_seconds", "parameters", every key of
    :func:`bnnconvert.metrics.evaluate` for the task, "ood_auroc" (None without
    ``ood_data``), and with ``flops``: "train_flops", "train_flops_x",
    "inference_flops", "inference_flops_x", "parameters_x" (the "_x" keys are multiples
    of the deterministic model), plus
    "note" (e.g. which converter a full-Bayes row used). Render it with
    :func:`results_markdown`.
    """
    names = check_method_names(methods, task)  # every name, before anything trains
    pretrain_epochs = epochs if pretrain_epochs is None else pretrain_epochs
    train_kwargs = dict(train_kwargs or {})
    trained = _step_one(model, train_data, task, pretrain_epochs, seed, settings, train_kwargs)
    fmt = train_kwargs.get("batch_format")
    reference = (
        _reference_cost(trained, train_data, epochs, pretrain_epochs, fmt) if flops else None
    )
    data = (train_data, test_data, ood_data, val_data)
    setup = _Setup(*data, epochs, pretrain_epochs, seed, settings, train_kwargs, reference)
    rows = []
    bar = tqdm(names, desc="methods", unit="method", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        kwargs = {"task": task, "samples": samples, **(method_kwargs or {}).get(name, {})}
        rows.append(setup.run(get_method(name, trained, **kwargs)))
        log.info("%s: %s", name, {k: v for k, v in rows[-1].items() if isinstance(v, float)})
    return rows


def _step_one(model, train_data, task, pretrain_epochs, seed, settings, train_kwargs):
    """The trained deterministic model: ``model`` itself, or a fresh one trained."""
    if isinstance(model, nn.Module):
        return model
    seed_everything(seed)
    fresh = model()
    if pretrain_epochs:
        reseed_data(train_data, seed)
        kwargs = {"progress": False, **train_kwargs}
        train(fresh, train_data, pretrain_epochs, settings, task=task, seed=seed, **kwargs)
    return fresh


@dataclass
class _Setup:
    """The data, budget and reference cost shared by every method of a comparison."""

    train_data: Iterable
    test_data: Iterable
    ood_data: Iterable | Tensor | None
    val_data: Iterable | None
    epochs: int
    pretrain_epochs: int
    seed: int
    settings: TrainSettings | None
    train_kwargs: dict[str, Any]
    reference: dict[str, Any] | None

    def run(self, method: Method) -> dict[str, Any]:
        """Fit ``method`` with its budget, predict, evaluate and cost it: one result row."""
        ensemble = isinstance(method, Ensemble)
        budget = self.pretrain_epochs + self.epochs if ensemble else self.epochs
        start = time.perf_counter()
        kwargs = {"seed": self.seed, "val_data": self.val_data, "settings": self.settings}
        kwargs.update(self.train_kwargs)
        method.fit(self.train_data, epochs=budget, **kwargs)
        seconds = time.perf_counter() - start
        prediction = method.predict(self.test_data, keep_samples=False)
        outside = None
        if self.ood_data is not None:
            outside = method.predict(self.ood_data, keep_samples=False)
        ood = None if outside is None else entropy_auroc(prediction, outside)
        row: dict[str, Any] = {
            "method": method.name,
            "task": method.task,
            "epochs": budget,
            "train_steps": method.train_steps,
            "fit_seconds": seconds,
            "parameters": method.num_parameters(),
            **evaluate(prediction, task=method.task),
            "ood_auroc": ood,
            "note": _note(method, ensemble),
            "per_item": per_item_values(prediction, outside, method.task),
        }
        if self.reference is not None:
            row.update(_cost_row(method, self.reference, shared_pretraining=not ensemble))
        return row


def per_item_values(
    prediction: Prediction, ood: Prediction | None, task: str
) -> dict[str, list[float]]:
    """What :meth:`ComparisonReport.paired` pairs between methods: per test item its NLL
    ("nll", :func:`~bnnconvert.metrics.item_nll`, the mean over pixels or labels) and its
    uncertainty ("uncertainty", the entropy of the expected prediction per image), and
    with ``ood`` the uncertainty of each OOD item ("ood_uncertainty")."""
    probs, targets = prediction.probs, prediction.targets.to(prediction.probs.device)
    if task == "segmentation":  # as the segmentation metrics read them
        probs = torch.cat([1 - probs, probs], 1) if probs.shape[1] == 1 else probs
        targets = targets[:, 0] if targets.ndim == probs.ndim else targets
    kind = "multilabel" if task == "multilabel" else "multiclass"
    values = {
        "nll": item_nll(probs, targets, task=kind).tolist(),
        "uncertainty": image_uncertainty(prediction).tolist(),
    }
    if ood is not None:
        values["ood_uncertainty"] = image_uncertainty(ood).tolist()
    return values


def _note(method: Method, ensemble: bool) -> str:
    if ensemble:
        return f"{method.members} members from scratch"
    if isinstance(method, FullBayes):
        return f"converted by {method.backend_used}"
    if isinstance(method, LaplaceLastLayer):
        return (
            f"{method.hessian_structure} Hessian, {method.pred_type}/{method.link_approx} "
            f"predictive, prior precision {method.prior_precision:.3g} (marglik), "
            f"{method.laplace_seconds:.1f} s post hoc"
        )
    return ""


def _reference_cost(
    model: nn.Module,
    data: Iterable,
    epochs: int,
    pretrain: int,
    batch_format: BatchFormat | None = None,
) -> dict[str, Any]:
    """The deterministic pipeline's cost: the inputs of the first batch of ``data`` (read
    by ``batch_format``: x (N, ...) or keyword inputs), one forward, the pretraining and
    the whole pipeline (steps x epochs), and the parameters."""
    x, _ = split_batch(next(iter(data)), batch_format=batch_format)
    steps = len(data) if hasattr(data, "__len__") else 1
    step = training_cost(model, x, batch_format=batch_format).per_step
    return {
        "inputs": x,
        "forward": count_flops(model, x, batch_format=batch_format).total,
        "pretrain": pretrain * steps * step,
        "total": (pretrain + epochs) * steps * step,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _cost_row(method: Method, ref: dict, shared_pretraining: bool) -> dict[str, float]:
    cost = method.flops(ref["inputs"])
    total = cost["train_run"] + (ref["pretrain"] if shared_pretraining else 0)
    return {
        "train_flops": total,
        "train_flops_x": total / ref["total"] if ref["total"] else math.nan,
        "inference_flops": cost["inference"],
        "inference_flops_x": cost["inference"] / ref["forward"],
        "parameters_x": method.num_parameters() / ref["parameters"],
    }


def ood_auroc(method: Method, in_distribution: Prediction, ood_data: Iterable | Tensor) -> float:
    """AUROC of telling ``ood_data`` (positives) from the test inputs (negatives) by the
    entropy of the expected prediction, per image (mean over pixels or labels)."""
    return entropy_auroc(in_distribution, method.predict(ood_data, keep_samples=False))


# ---------------------------------------------------------------------- the report
def sweep_method_names(r_values: Sequence[float] = SWEEP_R_BAYES) -> dict[str, float]:
    """{method name: r_bayes} of a sweep: ``{"partial1": 0.01, "partial5": 0.05, ...}``."""
    names = {}
    for r in r_values:
        check_r_bayes(r)
        names[f"partial{100 * float(r):g}"] = float(r)
    return names


@dataclass
class ComparisonReport:
    """The rows of a comparison (dicts of :func:`evaluate_methods`).

    Attributes:
        rows: one row per requested method, in the order asked.
        sweep: one row per r_bayes of the sweep, with the extra key "r_bayes" (empty
            without a sweep); a sweep method also requested is trained once.
        settings: what produced them (data, model, budget, seed, machine), for the report.
    """

    rows: list[dict[str, Any]]
    sweep: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """The task of the rows: "multiclass", "multilabel" or "segmentation"."""
        return str((self.rows or self.sweep)[0]["task"])

    def _itemised(self) -> dict[str, dict[str, Any]]:
        return {r["method"]: r for r in [*self.rows, *self.sweep] if "per_item" in r}

    def reference(self) -> str | None:
        """The default reference of :meth:`paired`: "temperature" if it was run, else
        "deterministic", else None."""
        rows = self._itemised()
        return next((n for n in ("temperature", "deterministic") if n in rows), None)

    def paired(self, reference: str | None = None) -> dict[str, dict[str, PairedDifference]]:
        """:func:`paired_differences` of every row (and sweep row) against ``reference``,
        by default :meth:`reference`; {} when there is none."""
        reference = reference or self.reference()
        rows = list(self._itemised().values())
        return {} if reference is None else paired_differences(rows, reference)

    def markdown(self) -> str:
        """The report: settings, the comparison table, the paired differences against the
        reference method (:meth:`paired`) and, with a sweep, its table and figure (linked
        as ``r_bayes_sweep.png``)."""
        parts = ["# Benchmark", "", *_settings_lines(self.settings)]  # the command's name
        parts += ["", "## Comparison", "", results_markdown(self.rows)]
        reference = self.reference()
        if reference is not None:
            parts += ["", paired_markdown(list(self._itemised().values()), reference)]
        if self.sweep:
            parts += ["", "## r_bayes sweep", "", results_markdown(self.sweep), ""]
            parts += [f"![r_bayes sweep]({REPORT_FILES['sweep']})"]
        return "\n".join(parts) + "\n"

    def sweep_figure(self, path: str | os.PathLike | None = None, *, dpi: int = 100) -> Figure:
        """The paper's Figure 4 from the sweep rows: task metric, ECE, NLL, Brier (and
        the OOD AUROC when measured) against r_bayes, the training FLOPs on the right
        axis, the other requested methods as horizontal lines."""
        if not self.sweep:
            raise ValueError("no sweep in this result; run_comparison(..., sweep=SWEEP_R_BAYES)")
        first = "dice" if self.task == "segmentation" else "accuracy"
        metrics = [first, "ece", "nll", "brier"]
        if self.sweep[0].get("ood_auroc") is not None:
            metrics.append("ood_auroc")
        swept = {r["method"] for r in self.sweep}
        baselines = {r["method"]: r for r in self.rows if r["method"] not in swept}
        return r_bayes_sweep(
            self.sweep,
            path,
            metrics=metrics,
            baselines=baselines,
            flops_key="train_flops",
            dpi=dpi,
        )

    def to_json(self) -> str:
        """Rows (without their per-item values), sweep, settings and the paired differences
        (:meth:`paired`) as JSON (NaN as null)."""
        rows, sweep = without_items(self.rows), without_items(self.sweep)
        paired = {n: {k: asdict(v) for k, v in d.items()} for n, d in self.paired().items()}
        record = {"settings": self.settings, "rows": rows, "sweep": sweep, "paired": paired}
        return json.dumps(json_safe(record), indent=2) + "\n"

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``results.md``, ``results.json`` and (with a sweep) ``r_bayes_sweep.png``
        into ``folder`` (created if needed, its parent must exist). Everything is rendered
        first and each file is replaced atomically, so a failure leaves no torn file."""
        folder = check_output_folder(folder)
        contents = {
            REPORT_FILES["table"]: self.markdown().encode(),
            REPORT_FILES["json"]: self.to_json().encode(),
        }
        if self.sweep:
            buffer = io.BytesIO()
            self.sweep_figure().savefig(buffer, format="png")
            contents[REPORT_FILES["sweep"]] = buffer.getvalue()
        folder.mkdir(exist_ok=True)
        paths = []
        for name, data in contents.items():
            atomic_write_bytes(folder / name, data)
            paths.append(folder / name)
        return paths


def run_comparison(
    model: nn.Module | Callable[[], nn.Module],
    train_data: Iterable,
    test_data: Iterable,
    *,
    task: str,
    methods: Sequence[str] | str = DEFAULT_METHODS,
    sweep: Sequence[float] | None = SWEEP_R_BAYES,
    epochs: int = 2,
    pretrain_epochs: int | None = None,
    samples: int = 5,
    seed: int = 0,
    ood_data: Iterable | None = None,
    val_data: Iterable | None = None,
    settings: TrainSettings | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    facts: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> ComparisonReport:
    """The comparison of the paper on ``methods`` and the r_bayes ``sweep``.

    Args:
        model, train_data, test_data, task, epochs, pretrain_epochs, samples, seed,
            ood_data, val_data, settings, train_kwargs, method_kwargs, progress: as in
            :func:`evaluate_methods` (``model`` is a trained model or a factory of a
            fresh one; batches are (input (N, C, H, W), target)).
        methods: method names (:func:`~bnnconvert.methods.get_method`), a list or a
            comma-separated string; checked before anything trains.
        sweep: r_bayes values of the sweep (fractions, default 1 to 80 %); None or ()
            for none. Each runs as method ``partial<percent>``.
        facts: extra facts for the report (e.g. the data and model names).

    Returns a :class:`ComparisonReport`.
    """
    names = check_method_names(methods, task)
    swept = sweep_method_names(sweep or ())
    todo = list(dict.fromkeys([*names, *swept]))  # each method once, in order
    start = time.perf_counter()
    rows = evaluate_methods(
        model,
        train_data,
        test_data,
        task=task,
        methods=todo,
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        samples=samples,
        seed=seed,
        ood_data=ood_data,
        val_data=val_data,
        method_kwargs=method_kwargs,
        settings=settings,
        train_kwargs=train_kwargs,
        progress=progress,
    )
    by_name = {r["method"]: r for r in rows}
    report_facts = {
        "task": task,
        "epochs": epochs,
        "pretrain_epochs": epochs if pretrain_epochs is None else pretrain_epochs,
        "samples": samples,
        "seed": seed,
        **dict(facts or {}),
        **_machine(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return ComparisonReport(
        rows=[by_name[n] for n in names],
        sweep=[{**by_name[n], "r_bayes": r} for n, r in swept.items()],
        settings=report_facts,
    )


def _finite(values: Mapping[str, list[float]]) -> bool:
    return all(math.isfinite(v) for column in values.values() for v in column)


def paired_differences(
    rows: Sequence[Mapping[str, Any]], reference: str
) -> dict[str, dict[str, PairedDifference]]:
    """Every row minus the row named ``reference`` on the same test items: {method:
    {"nll": ..., "ood_auroc": ... (with OOD data)}}, each a
    :class:`~bnnconvert.paired.PairedDifference` with its 95 % paired bootstrap interval
    (the test items, and the OOD items, resampled; the same draws for both methods), from
    the rows' "per_item" values (:func:`per_item_values`). Rows without them, or whose
    values are not finite (a diverged fit), are left out.

    Raises ValueError when no row is named ``reference``."""
    itemised = {r["method"]: r["per_item"] for r in rows if "per_item" in r}
    if reference not in itemised:
        raise ValueError(f"no method {reference!r} in these rows: one of {sorted(itemised)}")
    base = itemised[reference]
    out: dict[str, dict[str, PairedDifference]] = {}
    if not _finite(base):
        return out
    for name, mine in itemised.items():
        if name == reference or not _finite(mine):
            continue
        out[name] = {"nll": paired_difference(mine["nll"], base["nll"])}
        if "ood_uncertainty" in mine and "ood_uncertainty" in base:
            out[name]["ood_auroc"] = paired_difference(
                mine["uncertainty"], base["uncertainty"],
                ood_a=mine["ood_uncertainty"], ood_b=base["ood_uncertainty"],
            )  # fmt: skip
    return out


def paired_markdown(rows: Sequence[Mapping[str, Any]], reference: str) -> str:
    """The section "Paired differences against ``reference``" of a report: a table of
    :func:`paired_differences` ("" when no other row has per-item values)."""
    paired = paired_differences(rows, reference)
    if not paired:
        return ""
    n_items = next(iter(paired.values()))["nll"].items
    ood = any("ood_auroc" in diff for diff in paired.values())
    lines = [f"## Paired differences against {reference}", "",
             f"Each method minus {reference} on the same {n_items} test items"
             + (" (and the same OOD items)" if ood else "")
             + ", 95 % paired bootstrap intervals (the items resampled, the same draws for "
             "both; one seed: the interval says nothing about another training run). Lower "
             "NLL" + (" and higher OOD AUROC are" if ood else " is") + " better.", "",
             "| method | NLL |" + (" OOD AUROC |" if ood else ""),
             "|---|---|" + ("---|" if ood else "")]  # fmt: skip
    for name, diff in paired.items():
        cell = f" {diff['ood_auroc']} |" if "ood_auroc" in diff else (" |" if ood else "")
        lines.append(f"| {name} | {diff['nll']} |{cell}")
    return "\n".join(lines)


def without_items(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows without their "per_item" values (what the JSON reports keep)."""
    return [{k: v for k, v in row.items() if k != "per_item"} for row in rows]


def _machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads",
    }


def _settings_lines(settings: Mapping[str, Any]) -> list[str]:
    return [f"- {key}: {value}" for key, value in settings.items()]


# ---------------------------------------------------------------------- markdown
_COLUMNS = {
    "classification": (("accuracy", "accuracy"), ("auc", "AUC")),
    "segmentation": (("dice", "Dice"), ("iou", "IoU")),
}
_UNCERTAINTY = (("brier", "Brier"), ("entropy", "entropy"), ("ece", "ECE"), ("nll", "NLL"))


def results_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """The comparison table (markdown) of :func:`evaluate_methods`' rows:
    the task metrics, Brier, entropy of the expected prediction, ECE, NLL, OOD AUROC
    (when measured), parameters and FLOPs as multiples of the deterministic model."""
    if not results:
        raise ValueError("no results to render")
    kind = "segmentation" if results[0].get("task") == "segmentation" else "classification"
    columns = [*_COLUMNS[kind], *_UNCERTAINTY]
    if any(r.get("ood_auroc") is not None for r in results):
        columns.append(("ood_auroc", "OOD AUROC"))
    header = ["method", *(label for _, label in columns)]
    header += ["parameters", "training FLOPs", "inference FLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for r in results:
        cells = [str(r["method"]), *(_number(r.get(key)) for key, _ in columns)]
        cells += [
            f"{r['parameters']:,}",
            _multiple(r.get("train_flops_x")),
            _multiple(r.get("inference_flops_x")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"- {r['method']}: {r['epochs']} epochs, {r['note']}" for r in results if r.get("note")
    ]
    footer = (
        "Training FLOPs: the whole pipeline (shared deterministic pretraining + each method's "
        "budget; the ensemble trains its members from scratch) over the deterministic one; "
        "inference FLOPs: one prediction over one deterministic forward."
    )
    return "\n".join([*lines, "", footer, *notes])


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def _multiple(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def compare_methods_on_data(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Deprecated alias of :func:`evaluate_methods` (the old name did not say that it
    trains and evaluates each method); it will be removed in a later release."""
    warnings.warn(
        "compare_methods_on_data is deprecated; use bnnconvert.methods.evaluate_methods",
        DeprecationWarning,
        stacklevel=2,
    )
    return evaluate_methods(*args, **kwargs)
