"""The paper's recipe end to end on the bundled real data (``bnnconvert demo``).

:func:`run_demo` runs the three steps of the method twice, on real images that ship with
the package (no download):

- classification: a ResNet18 on the bundled MNIST digits
  (:func:`bnnconvert.data.demo_classification`), out-of-distribution photographs
  (:func:`~bnnconvert.data.demo_ood`) for the OOD AUROC;
- segmentation: a UNet on the bundled fluorescence nuclei tiles
  (:func:`~bnnconvert.data.demo_segmentation`).

Step 1 trains the deterministic model for ``pretrain_epochs`` epochs; step 2 runs the
saliency pass (:func:`bnnconvert.compute_saliency`); step 3 converts at each r_bayes
(1 % by default) and fine-tunes with the ELBO for ``epochs`` epochs. The fair baseline is
the step-1 model trained on with the plain NLL for the same ``epochs`` epochs. Every model
is evaluated by :func:`bnnconvert.training.evaluate_model` (Monte Carlo prediction and
:func:`bnnconvert.metrics.evaluate`); the classifiers also by the AUROC of telling the
test digits from the OOD photographs by the entropy of the expected prediction
(:func:`bnnconvert.metrics.entropy_auroc`). FLOPs are counted with
:func:`bnnconvert.costs.compare_method_costs`.

The settings are the :class:`Recipe`: a :class:`~bnnconvert.training.TrainSettings` for
the extra epochs and the sigma initialisation; its defaults are the ones tuned on the
bundled digits (see ``docs/results.md``). The budgets (:data:`BUDGETS`): "quick" (seconds,
for the tests), "default" (about 4 minutes on an idle 2-core CPU) and "full" (the paper's
protocol: 50 + 50 epochs, the r_bayes sweep 1 to 80 %).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ._utils import atomic_write_text, json_safe
from .convert import bayes_summary, convert
from .costs import ComparisonTable, compare_method_costs
from .data import demo_classification, demo_ood, demo_segmentation, make_loader
from .layers import bayesian_layers
from .losses import task_loss
from .methods import results_markdown
from .metrics import entropy_auroc
from .models import UNet, resnet18
from .plots import reliability_diagram, segmentation_overlay
from .predict import Prediction, predict
from .saliency import check_r_bayes, compute_saliency
from .training import TrainSettings, evaluate_model, seed_everything, train

__all__ = ["BUDGETS", "FULL_RECIPE", "Budget", "DemoResult", "Recipe", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """The settings of the demo (the defaults are those tuned in ``docs/results.md``).

    Attributes:
        training: how the extra epochs train, the ELBO fine-tuning and the baseline's
            further NLL epochs alike (:class:`~bnnconvert.training.TrainSettings`): the
            paper's SGD (lr 0.01, no momentum, weight decay 1e-5; rho gets no weight
            decay), beta 0.01, the "mean" KL reduction and S = 2 samples per ELBO step.
        pretrain_momentum: SGD momentum of step 1 only (0.9 trains the deterministic
            model in a few epochs; the rest of ``training`` alike).
        moped_delta: sigma initialisation sigma = moped_delta x |mu| (MOPED); None uses
            ``rho_init`` instead (sigma = softplus(rho_init), the paper's -3).
        rho_init: see ``moped_delta``.
        seg_moped_delta: the MOPED delta of the segmentation UNet (None: ``moped_delta``);
            0.3 collapsed its Dice from 0.94 to 0.86 on the nuclei, 0.1 kept it at 0.93
            (docs/results.md).
        eval_samples: posterior samples per prediction (the paper: 5).
    """

    training: TrainSettings = field(default_factory=partial(TrainSettings, samples=2))
    pretrain_momentum: float = 0.9
    moped_delta: float | None = 0.3
    rho_init: float = -3.0
    seg_moped_delta: float | None = 0.1
    eval_samples: int = 5

    def settings(self, step_one: bool = False) -> TrainSettings:
        """The :class:`~bnnconvert.training.TrainSettings` of step 1 (``step_one``) or of
        the extra epochs."""
        return self.training.replace(momentum=self.pretrain_momentum) if step_one else self.training

    def sigma_init(self, task: str) -> dict[str, Any]:
        """The keyword arguments of :func:`bnnconvert.convert` that set the initial sigma."""
        seg = task == "segmentation" and self.seg_moped_delta is not None
        return {
            "rho_init": self.rho_init,
            "moped_delta": self.seg_moped_delta if seg else self.moped_delta,
        }


@dataclass(frozen=True)
class Budget:
    """How much of each data set the demo uses and for how long it trains.

    Attributes:
        name: "quick", "default" or "full".
        pretrain_epochs: P, step-1 epochs of the classifier; ``epochs``: E, the extra
            budget (ELBO fine-tuning, and the baseline's further NLL epochs).
        seg_pretrain_epochs, seg_epochs: the same for the UNet.
        r_values: the r_bayes of the partial models.
        train_size, test_size: a seeded random subset of the digits (train; test and OOD
            alike); None uses every image.
        seg_train_size: a seeded random subset of the nuclei training tiles; None: all.
        unet_base: channels of the UNet's first stage.
    """

    name: str
    pretrain_epochs: int
    epochs: int
    seg_pretrain_epochs: int
    seg_epochs: int
    r_values: tuple[float, ...] = (0.01,)
    train_size: int | None = None
    test_size: int | None = None
    seg_train_size: int | None = None
    unet_base: int = 16


BUDGETS: dict[str, Budget] = {
    "quick": Budget("quick", 2, 1, 6, 1, train_size=400, test_size=100, seg_train_size=60,
                    unet_base=8),
    "default": Budget("default", 3, 1, 6, 2),
    "full": Budget("full", 50, 50, 50, 50, r_values=(0.01, 0.05, 0.1, 0.2, 0.4, 0.8)),
}  # fmt: skip
"""The demo's budgets: "quick" (the tests: about 20 s, enough for the models to learn,
accuracy and Dice far above chance), "default" (about 4 minutes on an idle 2-core
CPU, 24 under heavy load), "full" (the paper's 50 epochs, r_bayes 1 to 80 %)."""

FULL_RECIPE = Recipe(TrainSettings(samples=5), pretrain_momentum=0.0)
"""The recipe of ``full=True``: the paper's SGD (no momentum) and S = 5 throughout."""

BATCH_SIZE = {"classification": 50, "segmentation": 10}
"""The paper's batch sizes."""

ECE_BINS = 15
"""Bins of the reliability diagrams: those of the ECE in the tables
(:func:`bnnconvert.metrics.evaluate`'s default)."""


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        classification, segmentation: one row per model (dicts as
            :func:`bnnconvert.methods.results_markdown` renders them: "method", every
            metric of :func:`bnnconvert.metrics.evaluate`, "ood_auroc" (classification),
            "parameters", "train_flops_x" (the whole pipeline over the deterministic
            pipeline of P + E epochs), "inference_flops_x", "epochs", "note").
        flops: the cost of each method (:class:`~bnnconvert.flops.ComparisonTable`) for
            the classifier and the UNet.
        budget, recipe, seed, seconds: the settings and the wall time of the run.
        files: every file written, in the output folder.
    """

    classification: list[dict[str, Any]]
    segmentation: list[dict[str, Any]]
    flops: dict[str, ComparisonTable]
    budget: Budget
    recipe: Recipe
    seed: int
    seconds: float = math.nan
    files: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        """The report: settings, the two comparison tables and the FLOP tables."""
        b, r, t = self.budget, self.recipe, self.recipe.training
        sigma = (
            f"MOPED sigma = {r.moped_delta:g} x |mu|"
            if r.moped_delta is not None
            else f"rho_init {r.rho_init:g}"
        )
        if r.seg_moped_delta is not None:
            sigma += f" ({r.seg_moped_delta:g} x |mu| for the UNet)"
        lines = [
            "# bnnconvert demo",
            "",
            f"Budget {b.name!r}, seed {self.seed}, {self.seconds:.0f} s. SGD lr {t.lr:g}, momentum "
            f"{t.momentum:g}, weight decay {t.weight_decay:g}; step 3: {sigma}, beta {t.beta}, "
            f"KL reduction {t.kl_reduction!r}, S = {t.samples} samples per training step, "
            f"{r.eval_samples} per prediction.",
            "",
            f"## Classification: ResNet18 on the bundled digits (P = {b.pretrain_epochs}, "
            f"E = {b.epochs} epochs)",
            "",
            "OOD AUROC: test digits against the bundled photographs, scored by the entropy "
            "of the expected prediction.",
            "",
            results_markdown(self.classification),
            "",
            f"## Segmentation: UNet on the bundled nuclei tiles (P = {b.seg_pretrain_epochs}, "
            f"E = {b.seg_epochs} epochs)",
            "",
            results_markdown(self.segmentation),
        ]
        for name, table in self.flops.items():
            lines += ["", f"## FLOPs of each method ({name}, fvcore)", "", str(table)]
            lines.append(
                f"- This table counts S = {t.samples} (the training samples); the predictions "
                f"above use {r.eval_samples}, see their inference column."
            )
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """The numbers as plain JSON types (NaN as None)."""
        recipe = {**asdict(self.recipe), "training": self.recipe.training.description()}
        return json_safe({
            "budget": asdict(self.budget),
            "recipe": recipe,
            "seed": self.seed,
            "seconds": self.seconds,
            "classification": self.classification,
            "segmentation": self.segmentation,
            "flops": {name: table.multiples() for name, table in self.flops.items()},
        })  # fmt: skip


def run_demo(
    out: str | os.PathLike = "demo_output",
    *,
    quick: bool = False,
    full: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    r_bayes: Sequence[float] | None = None,
    recipe: Recipe | None = None,
    progress: bool = False,
) -> DemoResult:
    """Run the recipe on the bundled data and write the report and plots to ``out``.

    Args:
        out: the output folder (created if needed). Written there: ``results.md``,
            ``results.json``, ``reliability_deterministic.png``,
            ``reliability_partial_<percent>.png`` (one per r_bayes), ``segmentation.png``
            (input, prediction overlay, entropy map of the partial model on one test
            tile). Files appear only once the whole run has succeeded.
        quick, full: the budget (:data:`BUDGETS`): "quick", "full", else "default".
        seed: seeds the models, the data order and the Monte Carlo samples.
        device: where to train and predict ("cpu", "cuda", ...); default CPU.
        r_bayes: fractions of Bayesian entries, in (0, 1]; default the budget's (1 %).
        recipe: the training settings; default :class:`Recipe` () (``full``:
            :data:`FULL_RECIPE`).
        progress: tqdm bars over the batches.

    Returns a :class:`DemoResult`; progress goes to ``logging`` (INFO).
    """
    if quick and full:
        raise ValueError("pass either quick or full, not both")
    budget = BUDGETS["quick" if quick else "full" if full else "default"]
    if r_bayes is not None:
        if len(r_bayes) == 0:
            raise ValueError("r_bayes is empty; pass at least one fraction, e.g. [0.01]")
        for r in r_bayes:
            check_r_bayes(r)
        budget = replace(budget, r_values=tuple(r_bayes))
    recipe = recipe or (FULL_RECIPE if full else Recipe())
    device = torch.device(device or "cpu")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass a folder for the demo's outputs (out=...)")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".demo-") as tmp:
        run = _Run(budget, recipe, seed, device, progress, Path(tmp))
        cls_rows, cls_flops = run.classification()
        seg_rows, seg_flops = run.segmentation()
        flops = {"ResNet18, digits": cls_flops, "UNet, nuclei": seg_flops}
        result = DemoResult(cls_rows, seg_rows, flops, budget, recipe, seed)
        result.seconds = time.perf_counter() - start
        atomic_write_text(Path(tmp) / "results.md", result.markdown())
        atomic_write_text(Path(tmp) / "results.json", json.dumps(result.to_json(), indent=2))
        for path in sorted(Path(tmp).iterdir()):
            os.replace(path, folder / path.name)
            result.files.append(folder / path.name)
    log.info("demo done in %.0f s; wrote %s", result.seconds, ", ".join(map(str, result.files)))
    return result


# ---------------------------------------------------------------------- the run
@dataclass
class _Run:
    """One demo run: the settings, and where the plots go."""

    budget: Budget
    recipe: Recipe
    seed: int
    device: torch.device
    progress: bool
    folder: Path

    def classification(self) -> tuple[list[dict[str, Any]], ComparisonTable]:
        b = self.budget
        train_set = _subset(demo_classification("train"), b.train_size, self.seed)
        test = self._loader(_subset(demo_classification("test"), b.test_size, self.seed), 250)
        ood = self._loader(_subset(demo_ood(), b.test_size, self.seed), 250)
        data = self._loader(train_set, BATCH_SIZE["classification"], shuffle=True)
        models = self._recipe(
            "classification", lambda: resnet18(10, 1), data, b.pretrain_epochs, b.epochs
        )
        rows = []
        for name, model in models.items():
            prediction, row = self._evaluate(name, model, test, "multiclass")
            row["ood_auroc"] = self._ood_auroc(model, prediction, ood)
            rows.append(row)
            if name != "deterministic (step 1)":
                path = self.folder / f"reliability_{_slug(name)}.png"
                _reliability(prediction, path, name)
        table = self._flops(models, data, b.pretrain_epochs, b.epochs, rows)
        return rows, table

    def segmentation(self) -> tuple[list[dict[str, Any]], ComparisonTable]:
        b = self.budget
        train_set = _subset(demo_segmentation("train"), b.seg_train_size, self.seed)
        test_set = demo_segmentation("test")
        test = self._loader(test_set, BATCH_SIZE["segmentation"])
        data = self._loader(train_set, BATCH_SIZE["segmentation"], shuffle=True)
        models = self._recipe(
            "segmentation",
            lambda: UNet(1, 2, base=b.unet_base),
            data,
            b.seg_pretrain_epochs,
            b.seg_epochs,
        )
        rows = []
        for name, model in models.items():
            prediction, row = self._evaluate(name, model, test, "segmentation")
            rows.append(row)
            if name == _partial_name(b.r_values[0]):
                _overlay(test_set, prediction, self.folder / "segmentation.png", name)
        table = self._flops(models, data, b.seg_pretrain_epochs, b.seg_epochs, rows)
        return rows, table

    # ------------------------------------------------------------------ steps
    def _recipe(
        self, kind: str, build, data: Iterable, pretrain: int, epochs: int
    ) -> dict[str, nn.Module]:
        """Steps 1 to 3: {row name: trained model}, the step-1 model first."""
        task = "multiclass" if kind == "classification" else "segmentation"
        fit = {"task": task, "device": self.device, "seed": self.seed, "progress": self.progress}
        seed_everything(self.seed)
        det = build().to(self.device)
        log.info("%s, step 1: deterministic training, %d epochs", kind, pretrain)
        train(det, data, pretrain, self.recipe.settings(step_one=True), **fit)
        log.info("%s, baseline: %d more deterministic epochs", kind, epochs)
        baseline = copy.deepcopy(det)
        train(baseline, data, epochs, self.recipe.settings(), **fit)
        models = {"deterministic (step 1)": det, "deterministic": baseline}
        log.info("%s, step 2: saliency pass", kind)
        saliency = compute_saliency(det, data, task_loss(task), device=self.device)
        for r in self.budget.r_values:
            pbnn = convert(det, saliency, r, **self.recipe.sigma_init(task))
            log.info("%s, step 3: r_bayes %g %%, ELBO for %d epochs\n%s", kind, 100 * r,
                     epochs, bayes_summary(pbnn))  # fmt: skip
            train(pbnn, data, epochs, self.recipe.settings(), **fit)
            models[_partial_name(r)] = pbnn
        return models

    def _evaluate(
        self, name: str, model: nn.Module, data: Iterable, task: str
    ) -> tuple[Prediction, dict[str, Any]]:
        torch.manual_seed(self.seed)
        prediction, metrics = evaluate_model(
            model, data, task, samples=self.recipe.eval_samples, device=self.device
        )
        row = {"method": name, "task": task, **metrics, "ood_auroc": None}
        return prediction, row

    def _ood_auroc(self, model: nn.Module, prediction: Prediction, ood: Iterable) -> float:
        """AUROC of telling OOD images (positives) from the test images by the entropy."""
        torch.manual_seed(self.seed)
        other = predict(
            model,
            ood,
            self._samples(model),
            keep_samples=False,
            device=self.device,
            output_device="cpu",
        )
        return entropy_auroc(prediction, other)

    def _flops(
        self,
        models: Mapping[str, nn.Module],
        data: Iterable,
        pretrain: int,
        epochs: int,
        rows: list[dict[str, Any]],
    ) -> ComparisonTable:
        """The FLOP table, and each row's FLOPs over the deterministic pipeline (P + E)."""
        det = next(iter(models.values()))
        x = next(iter(data))[0].to(self.device)  # a training batch: sampling is per batch
        steps = len(data)
        table = compare_method_costs(
            det,
            x,
            r_values=self.budget.r_values,
            samples=self.recipe.training.samples,
            epochs=epochs,
            steps_per_epoch=steps,
            pretrain_epochs=pretrain,
            bayesian_torch=False,
            device=self.device,
        )
        costs = {c.method: c for c in table.rows}
        reference = costs["deterministic"]
        pipeline = (pretrain + epochs) * steps * reference.train_step
        for row in rows:
            name = row["method"]
            cost = costs.get(_flops_label(name), reference)
            if name == "deterministic (step 1)":
                train_run, total = pretrain * steps * reference.train_step, pretrain
                note = "step 1 only"
            elif name == "deterministic":
                train_run, total = pipeline, pretrain + epochs
                note = f"step 1 + {epochs} NLL epochs (the fair baseline)"
            else:
                train_run, total = cost.train_run, pretrain + epochs
                samples = self.recipe.training.samples
                note = f"step 1 + saliency + {epochs} ELBO epochs (S = {samples})"
            row.update(
                parameters=sum(p.numel() for p in models[name].parameters()),
                train_flops_x=train_run / pipeline,
                inference_flops_x=self._samples(models[name]) * cost.forward / reference.forward,
                epochs=total,
                note=note,
            )
        return table

    def _samples(self, model: nn.Module) -> int:
        return self.recipe.eval_samples if _is_bayesian(model) else 1

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False):
        return make_loader(dataset, batch_size, shuffle=shuffle, seed=self.seed, drop_last=shuffle)


# ---------------------------------------------------------------------- helpers
def _is_bayesian(model: nn.Module) -> bool:
    return any(True for _ in bayesian_layers(model))


def _partial_name(r: float) -> str:
    return f"partial {100 * r:g} %"


def _flops_label(name: str) -> str:
    """The :class:`~bnnconvert.flops.ComparisonTable` row of a demo row."""
    return name.replace("partial ", "partial r = ") if name.startswith("partial") else name


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c == "." else "_" for c in name.replace(" %", ""))
    return "_".join(part for part in keep.split("_") if part)


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``size`` items (all of them when None or larger)."""
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def _reliability(prediction: Prediction, path: Path, name: str) -> None:
    title = f"{name}: reliability on the test digits"
    reliability_diagram(prediction.probs, prediction.targets, ECE_BINS, path, title=title)


def _overlay(test_set: Dataset, prediction: Prediction, path: Path, name: str) -> None:
    """Input, overlay and entropy map of the test tile with the most foreground."""
    index = int(prediction.targets.flatten(1).sum(1).argmax())
    image, mask = test_set[index]
    title = f"{name}: test tile {index}"
    entropy = prediction.entropy[index]
    segmentation_overlay(image, prediction.probs[index].argmax(0), mask, entropy, path, title=title)
