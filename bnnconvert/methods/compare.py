"""Compare methods on the user's model and data under one protocol and one evaluation.

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
   (T = epochs), layer ensembles train network and heads jointly.
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
prediction (S forwards, M members, K checkpoints) over one deterministic forward.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..flops import count_flops, training_cost
from ..metrics import auc, evaluate
from ..predict import Prediction, split_batch
from ..train import seed_everything, train
from .base import Method, reseed_data
from .ensemble import Ensemble
from .full_bayes import FullBayes
from .registry import check_method_names, get_method

__all__ = ["compare_methods_on_data", "entropy_auroc", "ood_auroc", "results_markdown"]

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("deterministic", "ensemble5", "partial1")


def compare_methods_on_data(
    model: nn.Module | Callable[[], nn.Module],
    train_data: Iterable,
    test_data: Iterable,
    *,
    task: str,
    methods: Sequence[str] | str = DEFAULT_METHODS,
    epochs: int = 2,
    pretrain_epochs: int | None = None,
    samples: int = 5,
    seed: int = 0,
    ood_data: Iterable | None = None,
    val_data: Iterable | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
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
            the same data order).
        test_data: (input, target) batches for the metrics.
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
        train_kwargs: keyword arguments for every fit (lr, momentum, class_weights, ...).
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
    names = check_method_names(methods)  # every name, before anything trains
    pretrain_epochs = epochs if pretrain_epochs is None else pretrain_epochs
    train_kwargs = dict(train_kwargs or {})
    trained = _step_one(model, train_data, task, pretrain_epochs, seed, train_kwargs)
    reference = _reference_cost(trained, train_data, epochs, pretrain_epochs) if flops else None
    data = (train_data, test_data, ood_data, val_data)
    setup = _Setup(*data, epochs, pretrain_epochs, seed, train_kwargs, reference)
    rows = []
    bar = tqdm(names, desc="methods", unit="method", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        kwargs = {"task": task, "samples": samples, **(method_kwargs or {}).get(name, {})}
        rows.append(setup.run(get_method(name, trained, **kwargs)))
        log.info("%s: %s", name, {k: v for k, v in rows[-1].items() if isinstance(v, float)})
    return rows


def _step_one(model, train_data, task, pretrain_epochs, seed, train_kwargs) -> nn.Module:
    """The trained deterministic model: ``model`` itself, or a fresh one trained."""
    if isinstance(model, nn.Module):
        return model
    seed_everything(seed)
    fresh = model()
    if pretrain_epochs:
        reseed_data(train_data, seed)
        kwargs = {"progress": False, **train_kwargs}
        train(fresh, train_data, pretrain_epochs, task=task, seed=seed, **kwargs)
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
    train_kwargs: dict[str, Any]
    reference: dict[str, Any] | None

    def run(self, method: Method) -> dict[str, Any]:
        """Fit ``method`` with its budget, predict, evaluate and cost it: one result row."""
        ensemble = isinstance(method, Ensemble)
        budget = self.pretrain_epochs + self.epochs if ensemble else self.epochs
        start = time.perf_counter()
        kwargs = {"seed": self.seed, "val_data": self.val_data, **self.train_kwargs}
        method.fit(self.train_data, epochs=budget, **kwargs)
        seconds = time.perf_counter() - start
        prediction = method.predict(self.test_data, keep_samples=False)
        ood = None if self.ood_data is None else ood_auroc(method, prediction, self.ood_data)
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
        }
        if self.reference is not None:
            row.update(_cost_row(method, self.reference, shared_pretraining=not ensemble))
        return row


def _note(method: Method, ensemble: bool) -> str:
    if ensemble:
        return f"{method.members} members from scratch"
    if isinstance(method, FullBayes):
        return f"converted by {method.backend_used}"
    return ""


def _reference_cost(model: nn.Module, data: Iterable, epochs: int, pretrain: int) -> dict:
    """The deterministic pipeline's cost: one batch, its forward, step and epochs."""
    x, _ = split_batch(next(iter(data)))
    steps = len(data) if hasattr(data, "__len__") else 1
    step = training_cost(model, x).per_step
    return {
        "inputs": x,
        "forward": count_flops(model, x).total,
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


def entropy_auroc(in_distribution: Prediction, ood: Prediction) -> float:
    """AUROC of telling ``ood`` (positives) from ``in_distribution`` (negatives) by the
    entropy of the expected prediction, per image (mean over pixels or labels)."""
    scores = torch.cat([_image_entropy(in_distribution), _image_entropy(ood)])
    labels = torch.cat([torch.zeros(len(in_distribution)), torch.ones(len(ood))]).long()
    return float(auc(scores[:, None], labels[:, None], task="multilabel"))


def _image_entropy(prediction: Prediction) -> Tensor:
    entropy = prediction.entropy.double().cpu()
    return entropy.flatten(1).mean(1) if entropy.dim() > 1 else entropy


# ---------------------------------------------------------------------- markdown
_COLUMNS = {
    "classification": (("accuracy", "accuracy"), ("auc", "AUC")),
    "segmentation": (("dice", "Dice"), ("iou", "IoU")),
}
_UNCERTAINTY = (("brier", "Brier"), ("entropy", "entropy"), ("ece", "ECE"), ("nll", "NLL"))


def results_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """The comparison table (markdown) of :func:`compare_methods_on_data`'s results:
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
