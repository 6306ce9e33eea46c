"""The method end to end on the bundled real data (``bnnconvert demo``).

:func:`run_demo` runs the method twice, on real images that ship with the package (no
download):

- classification: a ResNet18 on the bundled MNIST digits
  (:func:`bnnconvert.data.demo_classification`), out-of-distribution photographs
  (:func:`~bnnconvert.data.demo_ood`) for the OOD AUROC;
- segmentation: a UNet on the bundled fluorescence nuclei tiles
  (:func:`~bnnconvert.data.demo_segmentation`).

Step 1 trains the deterministic model for ``pretrain_epochs`` epochs and the
"deterministic" row trains it ``epochs`` more: that is the checkpoint a user has. The rows
compare, on the test split (every choice made on the validation split):

- the checkpoint, and the checkpoint with temperature scaling;
- last-layer Laplace (laplace-torch, the classifier only; skipped when it is not
  installed: ``pip install "bnnconvert[compare]"``);
- bnnconvert's recommended recipe (:class:`Recipe`: ``posterior`` on ``selection``),
  fitted post hoc on the checkpoint with :func:`bnnconvert.fit_posterior` and calibrated
  on the validation split, and the same model at its means;
- the paper's recipe: the step-1 model converted at each r_bayes (rho_init -3) and
  fine-tuned with the ELBO for the same ``epochs`` (beta 0.01, "mean" KL), uncalibrated.

Every model is evaluated by :func:`bnnconvert.training.evaluate_model`; the classifiers
also by the AUROC of telling the test digits from the photographs by the entropy of the
expected prediction (:func:`bnnconvert.metrics.entropy_auroc`). FLOPs are counted with
fvcore (:func:`bnnconvert.count_flops`, :func:`bnnconvert.costs.compare_method_costs`).

The budgets (:data:`BUDGETS`): "quick" (seconds, for the tests), "default" (a few minutes
on an idle 2-core CPU) and "full" (the paper's protocol: 50 + 50 epochs, r_bayes 1 to 80 %
for the paper's rows).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ._utils import atomic_write_text, json_safe
from .convert import bayes_summary, convert, last_layer_masks
from .costs import ComparisonTable, compare_method_costs
from .data import demo_classification, demo_ood, demo_segmentation, make_loader
from .flops import count_flops, count_prediction_flops
from .layers import bayesian_layers, set_sigma_scale
from .losses import task_loss
from .methods import Deterministic, LaplaceLastLayer, results_markdown
from .methods.comparison import (
    paired_differences,
    paired_markdown,
    per_item_values,
    without_items,
)
from .metrics import ECE_BINS, entropy_auroc, evaluate
from .models import UNet, resnet18
from .plots import reliability_diagram, segmentation_overlay
from .posterior import METHODS, fit_posterior
from .predict import PREDICTIVES, Prediction, predict
from .saliency import check_r_bayes, compute_saliency
from .training import TrainSettings, seed_everything, train

__all__ = ["BUDGETS", "FULL_RECIPE", "SELECTIONS", "Budget", "DemoResult", "Recipe", "run_demo"]

log = logging.getLogger(__name__)

SELECTIONS = ("grad2", "last layer")
"""Where the recommended recipe puts its Bayesian entries: the grad2 top r_bayes (the
paper's selection) or every weight and bias of the last layer."""


@dataclass(frozen=True)
class Recipe:
    """The settings of the demo; the defaults of the recommended recipe are those that won
    on the validation splits of ``benchmarks/posterior_study.py`` (3 seeds, docs/results.md):
    the lowest mean validation NLL, and among recipes within 1 % of it the cheapest (the
    rule of :func:`bnnconvert.select_r_bayes`). Digits: Laplace on the last layer (the
    lowest; VI on the grad2 top 1 % within 1 % of it costs training epochs) with the
    probit predictive (the lower validation NLL than 300 Monte Carlo draws, and one
    forward); nuclei: Laplace on the grad2 top 1 % (the lowest; VI on the same entries
    within 1 %).

    Attributes:
        training: how the extra epochs train, the paper's ELBO fine-tuning and the
            baseline's further NLL epochs alike (:class:`~bnnconvert.training.TrainSettings`):
            the paper's SGD (lr 0.01, no momentum, weight decay 1e-5; rho gets no weight
            decay), beta 0.01, the "mean" KL reduction and S = 2 samples per ELBO step.
        pretrain_momentum: SGD momentum of step 1 only (0.9 trains the deterministic
            model in a few epochs; the rest of ``training`` alike).
        rho_init: the initial sigma = softplus(rho_init) of the paper's rows (the paper: -3).
        posterior: the recommended recipe's :func:`bnnconvert.fit_posterior` method for
            the classifier.
        selection: its Bayesian entries, one of :data:`SELECTIONS` (grad2: the
            budget's first r_bayes).
        seg_posterior, seg_selection: the same for the segmentation UNet.
        posterior_epochs: its training epochs ("vi", "paper").
        moped_delta: its initial sigma = moped_delta x |mu| (where "vi" starts; "laplace"
            replaces it).
        eval_samples: posterior samples per prediction and per calibration step (the
            paper's rows, and the recommended recipe on the grad2 selection).
        last_layer_samples: the same for a recommended recipe on the last layer, whose S
            draws cost S classifier forwards (the rest of the network runs once): chosen
            among 10, 100 and 300 by the study's rule on the validation NLL
            (``benchmarks/posterior_study/samples.md``).
        last_layer_predictive: the predictive of a recommended recipe on the last layer:
            "sample" (Monte Carlo, ``last_layer_samples`` draws) or "probit" (closed form,
            one forward; :func:`bnnconvert.set_predictive`), chosen by the study's rule on
            the validation NLL (``benchmarks/posterior_study/predictive.md``).
    """

    training: TrainSettings = field(default_factory=partial(TrainSettings, samples=2))
    pretrain_momentum: float = 0.9
    rho_init: float = -3.0
    posterior: str = "laplace"
    selection: str = "last layer"
    seg_posterior: str = "laplace"
    seg_selection: str = "grad2"
    posterior_epochs: int = 2
    moped_delta: float = 0.1
    eval_samples: int = 10
    last_layer_samples: int = 300
    last_layer_predictive: str = "probit"

    def __post_init__(self) -> None:
        if self.last_layer_predictive not in PREDICTIVES:
            raise ValueError(
                f"last_layer_predictive must be one of {PREDICTIVES}, got "
                f"{self.last_layer_predictive!r}"
            )
        for name in ("posterior", "seg_posterior"):
            if getattr(self, name) not in METHODS:
                raise ValueError(f"{name} must be one of {METHODS}, got {getattr(self, name)!r}")
        for name in ("selection", "seg_selection"):
            if getattr(self, name) not in SELECTIONS:
                raise ValueError(f"{name} must be one of {SELECTIONS}, got {getattr(self, name)!r}")

    def settings(self, step_one: bool = False) -> TrainSettings:
        """The :class:`~bnnconvert.training.TrainSettings` of step 1 (``step_one``) or of
        the extra epochs."""
        return self.training.replace(momentum=self.pretrain_momentum) if step_one else self.training

    def choice(self, task: str) -> tuple[str, str]:
        """(posterior method, selection) of the recommended recipe for ``task``."""
        if task == "segmentation":
            return self.seg_posterior, self.seg_selection
        return self.posterior, self.selection

    def predictive(self, task: str) -> str:
        """The recommended recipe's predictive for ``task`` ("sample" or "probit")."""
        return self.last_layer_predictive if self.choice(task)[1] == "last layer" else "sample"

    def samples(self, task: str) -> int:
        """S of the recommended recipe's calibration and predictions for ``task`` (1 for
        the probit predictive, which draws nothing)."""
        if self.predictive(task) == "probit":
            return 1
        if self.choice(task)[1] == "last layer":
            return self.last_layer_samples
        return self.eval_samples

    def name(self, task: str) -> str:
        """The recommended recipe's row name, e.g. "bnnconvert: laplace, last layer"."""
        return "bnnconvert: " + ", ".join(self.choice(task))


def _samples_text(recipe: Recipe, task: str) -> str:
    """How the recommended recipe predicts for ``task``: its S, or the probit."""
    if recipe.predictive(task) == "probit":
        return "the probit predictive (one forward, no sampling)"
    return f"S = {recipe.samples(task)} samples per prediction"


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

REFERENCE = "temperature scaling"
"""The row every other row of a demo table is compared with, item by item (the
"Paired differences" sections: NLL and OOD AUROC with 95 % paired bootstrap intervals)."""
"""The paper's batch sizes."""


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        classification, segmentation: one row per model (dicts as
            :func:`bnnconvert.methods.results_markdown` renders them: "method", every
            metric of :func:`bnnconvert.metrics.evaluate`, "ood_auroc" (classification),
            "parameters", "train_flops_x" (the whole pipeline over the deterministic
            pipeline of P + E epochs), "inference_flops_x", "epochs", "note").
        flops: the cost of the paper's rows (:class:`~bnnconvert.costs.ComparisonTable`)
            for the classifier and the UNet: training steps of S = ``training.samples``,
            predictions of S = ``eval_samples``, the S of the predictions in the tables.
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
        lines = [
            "# bnnconvert demo",
            "",
            f"Budget {b.name!r}, seed {self.seed}, {self.seconds:.0f} s. The recommended "
            f"recipe ({r.name('multiclass')}; {r.name('segmentation')}): a posterior fitted "
            "on the checkpoint's training data and calibrated (sigma scale t, temperature T) "
            f"on the validation split; {_samples_text(r, 'multiclass')} (classification) and "
            f"{_samples_text(r, 'segmentation')} (segmentation), "
            f"S = {r.eval_samples} for the paper's rows (inference FLOPs: the part of the "
            "network no Bayesian entry influences runs once). The paper's rows: "
            f"rho_init {r.rho_init:g}, {b.epochs} ELBO epoch(s) from step 1 with SGD lr "
            f"{t.lr:g}, momentum {t.momentum:g}, beta {t.beta}, KL {t.kl_reduction!r}, "
            f"S = {t.samples} per step. Every choice was made on the validation split; "
            "the tables are the test split.",
            "",
            f"## Classification: ResNet18 on the bundled digits (P = {b.pretrain_epochs}, "
            f"E = {b.epochs} epochs)",
            "",
            "OOD AUROC: test digits against the bundled photographs, scored by the entropy "
            "of the expected prediction.",
            "",
            results_markdown(self.classification),
            "",
            paired_markdown(self.classification, REFERENCE).replace("## ", "### ", 1),
            "",
            f"## Segmentation: UNet on the bundled nuclei tiles (P = {b.seg_pretrain_epochs}, "
            f"E = {b.seg_epochs} epochs)",
            "",
            results_markdown(self.segmentation),
            "",
            paired_markdown(self.segmentation, REFERENCE).replace("## ", "### ", 1),
        ]
        for name, table in self.flops.items():
            lines += ["", f"## FLOPs of the paper's rows ({name}, fvcore)", "", str(table)]
            lines.append(
                f"- This table counts S = {table.samples} samples per training step and "
                f"S = {table.inference_samples} per prediction, as the tables above."
            )
        return "\n".join(lines) + "\n"

    def _paired(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{"classification" / "segmentation": {row: {"nll": ..., "ood_auroc": ...}}}: the
        paired differences against :data:`REFERENCE`, as dicts."""
        tables = {"classification": self.classification, "segmentation": self.segmentation}
        return {
            kind: {
                name: {k: asdict(v) for k, v in diff.items()}
                for name, diff in paired_differences(rows, REFERENCE).items()
            }
            for kind, rows in tables.items()
        }

    def to_json(self) -> dict[str, Any]:
        """The numbers as plain JSON types (NaN as None)."""
        recipe = {**asdict(self.recipe), "training": self.recipe.training.description()}
        return json_safe({
            "budget": asdict(self.budget),
            "recipe": recipe,
            "seed": self.seed,
            "seconds": self.seconds,
            "classification": without_items(self.classification),
            "segmentation": without_items(self.segmentation),
            "paired": self._paired(),
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
Predictor = Callable[[Iterable], Prediction]


@dataclass
class _Model:
    """One row's model: how it predicts and what it costs."""

    predict: Predictor
    parameters: int
    train_epochs: float  # training cost in epochs of deterministic training steps
    forward_flops: int  # FLOPs of one prediction (S samples) on a training batch
    note: str
    bayesian: nn.Module | None = None  # the converted model, for the plots


@dataclass
class _Run:
    """One demo run: the settings, and where the plots go."""

    budget: Budget
    recipe: Recipe
    seed: int
    device: torch.device
    progress: bool
    folder: Path
    _reference: _Model | None = None  # the "deterministic" row: the unit of the FLOP ratios

    def classification(self) -> tuple[list[dict[str, Any]], ComparisonTable]:
        b = self.budget
        train_set = _subset(demo_classification("train"), b.train_size, self.seed)
        # 25 items per forward: the items of a forward share its S weight draws
        val = self._loader(_subset(demo_classification("val"), b.test_size, self.seed), 25)
        test = self._loader(_subset(demo_classification("test"), b.test_size, self.seed), 25)
        ood = self._loader(_subset(demo_ood(), b.test_size, self.seed), 25)
        models, table = self._rows(
            "multiclass", lambda: resnet18(10, 1), train_set, val, b.pretrain_epochs, b.epochs
        )
        self._reference = models["deterministic"]
        rows = []
        for name, model in models.items():
            prediction, row = self._evaluate(name, model, test, "multiclass")
            torch.manual_seed(self.seed)
            outside = model.predict(ood)
            row["ood_auroc"] = entropy_auroc(prediction, outside)
            row["per_item"] = per_item_values(prediction, outside, "multiclass")
            rows.append(row)
            if name in ("deterministic", self.recipe.name("multiclass")):
                _reliability(prediction, self.folder / f"reliability_{_slug(name)}.png", name)
        return rows, table

    def segmentation(self) -> tuple[list[dict[str, Any]], ComparisonTable]:
        b = self.budget
        train_set = _subset(demo_segmentation("train"), b.seg_train_size, self.seed)
        val = self._loader(demo_segmentation("val"), 2)  # 2 tiles share a weight draw
        test_set = demo_segmentation("test")
        test = self._loader(test_set, 2)
        models, table = self._rows(
            "segmentation",
            lambda: UNet(1, 2, base=b.unet_base),
            train_set,
            val,
            b.seg_pretrain_epochs,
            b.seg_epochs,
        )
        self._reference = models["deterministic"]
        rows = []
        for name, model in models.items():
            prediction, row = self._evaluate(name, model, test, "segmentation")
            row["per_item"] = per_item_values(prediction, None, "segmentation")
            rows.append(row)
            if name == self.recipe.name("segmentation"):
                _overlay(test_set, prediction, self.folder / "segmentation.png", name)
        return rows, table

    # ------------------------------------------------------------------ the rows
    def _rows(
        self, task: str, build, train_set: Dataset, val: Iterable, pretrain: int, epochs: int
    ) -> tuple[dict[str, _Model], ComparisonTable]:
        """{row name: model} in table order, and the FLOP table of the paper's rows."""
        kind = "classification" if task == "multiclass" else "segmentation"
        data = self._loader(train_set, BATCH_SIZE[kind], shuffle=True)
        ordered = self._loader(train_set, BATCH_SIZE[kind])
        fit = {"task": task, "device": self.device, "seed": self.seed, "progress": self.progress}
        seed_everything(self.seed)
        det = build().to(self.device)
        log.info("%s, step 1: deterministic training, %d epochs", kind, pretrain)
        train(det, data, pretrain, self.recipe.settings(step_one=True), **fit)
        step_one = copy.deepcopy(det)
        log.info("%s, the checkpoint: %d more deterministic epochs", kind, epochs)
        train(det, data, epochs, self.recipe.settings(), **fit)
        x = next(iter(data))[0].to(self.device)  # a training batch: sampling is per batch
        base = count_flops(det, x).total
        n_det = _parameters(det)
        rows = {
            "deterministic (step 1)": _Model(self._plain(step_one), n_det, pretrain, base,
                                             "step 1 only"),
            "deterministic": _Model(self._plain(det), n_det, pretrain + epochs, base,
                                    f"step 1 + {epochs} NLL epochs: the checkpoint"),
        }  # fmt: skip
        rows["temperature scaling"] = self._temperature(det, ordered, val, task, rows)
        if task == "multiclass":
            laplace = self._last_layer_laplace(det, ordered, rows)
            if laplace is not None:
                rows["last-layer Laplace (laplace-torch)"] = laplace
        rows.update(self._recommended(det, data, ordered, val, task, x, base, rows))
        log.info("%s, the paper's recipe from step 1", kind)
        for r in self.budget.r_values:
            pbnn = convert(step_one, compute_saliency(step_one, ordered, task_loss(task)), r,
                           rho_init=self.recipe.rho_init)  # fmt: skip
            train(pbnn, data, epochs, self.recipe.settings(), **fit)
            flops = count_prediction_flops(pbnn, x, self.recipe.eval_samples)
            samples = self.recipe.training.samples
            rows[_paper_name(r)] = _Model(
                self._bayes(pbnn), _parameters(pbnn),
                pretrain + 1 + epochs * samples, flops,
                f"step 1 + saliency + {epochs} ELBO epochs (S = {samples}), uncalibrated",
                pbnn,
            )  # fmt: skip
        table = compare_method_costs(
            step_one, x, r_values=self.budget.r_values, samples=self.recipe.training.samples,
            inference_samples=self.recipe.eval_samples, epochs=epochs,
            steps_per_epoch=len(data), pretrain_epochs=pretrain, bayesian_torch=False,
            device=self.device,
        )  # fmt: skip
        return rows, table

    def _temperature(self, det, ordered, val, task, rows) -> _Model:
        method = Deterministic(det, task=task, temperature_scaling=True)
        method.fit(ordered, epochs=0, val_data=val)
        base = rows["deterministic"]
        return _Model(
            lambda data: method.predict(data, keep_samples=False), base.parameters,
            base.train_epochs, base.forward_flops,
            f"the checkpoint, T = {method.temperature:.3f} fitted on the validation split",
        )  # fmt: skip

    def _last_layer_laplace(self, det, ordered, rows) -> _Model | None:
        try:
            method = LaplaceLastLayer(det, task="multiclass")
            method.fit(ordered, epochs=0)
        except ImportError as exc:
            log.warning("last-layer Laplace skipped: %s", exc)
            return None
        base = rows["deterministic"]
        return _Model(
            lambda data: method.predict(data, keep_samples=False), method.num_parameters(),
            base.train_epochs + 1, base.forward_flops,
            f"the checkpoint + laplace-torch (KFAC, prior precision "
            f"{method.prior_precision:.3g} by marginal likelihood, probit)",
        )  # fmt: skip

    def _recommended(self, det, data, ordered, val, task, x, base, rows):
        """The recommended recipe on the checkpoint, calibrated, and at its means."""
        r = self.recipe
        method, selection = r.choice(task)
        init = {"moped_delta": r.moped_delta}  # VI's start; Laplace replaces it
        if selection == "grad2":
            saliency = compute_saliency(det, ordered, task_loss(task), device=self.device)
            pbnn = convert(det, saliency, self.budget.r_values[0], **init)
        else:
            pbnn = convert(det, last_layer_masks(det), None, **init)
        log.info("%s\n%s", r.name(task), bayes_summary(pbnn))
        fit_data = data if method != "laplace" else ordered
        samples = r.samples(task)
        report = fit_posterior(
            pbnn, fit_data, val, method=method, task=task, epochs=r.posterior_epochs,
            samples=samples, seed=self.seed, device=self.device, progress=self.progress,
            predictive=r.predictive(task),
        )  # fmt: skip
        log.info("%s", report)
        c = report.calibration
        checkpoint = rows["deterministic"].train_epochs
        saliency_epochs = 1 if selection == "grad2" else 0
        fit_epochs = 1 if method == "laplace" else r.posterior_epochs * r.training.samples
        flops = count_prediction_flops(pbnn, x, samples)
        note = (
            f"the checkpoint {'+ saliency ' if saliency_epochs else ''}+ {method} "
            f"posterior (lambda {report.prior_precision:.3g}; about {fit_epochs} epoch(s) of "
            f"training cost), t = {c.scale:.3g} and T = {c.temperature:.3f} fitted on the "
            f"validation split, "
            + ("probit predictive" if r.predictive(task) == "probit" else f"S = {samples}")
        )
        extra = saliency_epochs + fit_epochs
        calibrated = _Model(partial(self._predict, pbnn, samples), _parameters(pbnn),
                            checkpoint + extra, flops, note, pbnn)  # fmt: skip
        means = _Model(self._at_means(pbnn), _parameters(pbnn), checkpoint + extra, base,
                       f"the same model at t = 0 (its means), T = {c.temperature:.3f}")  # fmt: skip
        return {r.name(task): calibrated, f"{r.name(task)}, at its means": means}

    # ------------------------------------------------------------------ predictors
    def _plain(self, model: nn.Module) -> Predictor:
        return partial(self._predict, model, 1)

    def _bayes(self, model: nn.Module) -> Predictor:
        return partial(self._predict, model, self.recipe.eval_samples)

    def _at_means(self, model: nn.Module) -> Predictor:
        def run(data: Iterable) -> Prediction:
            scales = [layer.bayes_scale.clone() for _, layer in bayesian_layers(model)]
            set_sigma_scale(model, 0.0)
            try:
                return self._predict(model, 1, data)
            finally:
                for (_, layer), value in zip(bayesian_layers(model), scales):
                    layer.bayes_scale.copy_(value)

        return run

    def _predict(self, model: nn.Module, samples: int, data: Iterable) -> Prediction:
        return predict(model, data, samples, keep_samples=False, device=self.device,
                       output_device="cpu")  # fmt: skip

    # ------------------------------------------------------------------ evaluation
    def _evaluate(
        self, name: str, model: _Model, data: Iterable, task: str
    ) -> tuple[Prediction, dict[str, Any]]:
        torch.manual_seed(self.seed)
        prediction = model.predict(data)
        metrics = evaluate(prediction, task=task)
        reference = self._reference
        row = {
            "method": name, "task": task, **metrics, "ood_auroc": None,
            "parameters": model.parameters,
            "train_flops_x": model.train_epochs / reference.train_epochs,
            "inference_flops_x": model.forward_flops / reference.forward_flops,
            "epochs": model.train_epochs, "note": model.note,
        }  # fmt: skip
        return prediction, row

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False):
        return make_loader(dataset, batch_size, shuffle=shuffle, seed=self.seed, drop_last=shuffle)


# ---------------------------------------------------------------------- helpers
def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _paper_name(r: float) -> str:
    return f"partial {100 * r:g} %, the paper's ELBO"


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
