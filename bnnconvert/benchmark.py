"""The paper's comparison on any data set: ``bnnconvert benchmark`` and its functions.

:func:`run_benchmark` runs :func:`~bnnconvert.methods.compare_methods_on_data` on the
requested methods plus the r_bayes sweep of the paper (partial 1, 5, 10, 20, 40, 80 %),
in one protocol: one shared deterministic step 1, the same extra budget for every
method, the deep ensemble trained from scratch. :class:`BenchmarkResult` renders the
markdown table (:func:`~bnnconvert.methods.results_markdown`) and the sweep figure
(:func:`bnnconvert.plots.r_bayes_sweep`) and writes them to a folder::

    result = run_benchmark(model, train_loader, test_loader, task="multiclass",
                           methods="deterministic,ensemble5,partial1", epochs=2)
    result.write("benchmark/")   # results.md, results.json, r_bayes_sweep.png
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch
from torch import nn

from .cli import (
    check_batch_size,
    cli_loader,
    cli_task_loss,
    data_options,
    model_options,
    show_progress,
)
from .io import build_model, load_checkpoint
from .methods.compare import compare_methods_on_data, results_markdown
from .methods.registry import check_method_names
from .train import check_fit, data_class_weights

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_METHODS",
    "SWEEP_R_BAYES",
    "BenchmarkResult",
    "benchmark_command",
    "check_output_folder",
    "run_benchmark",
    "sweep_method_names",
]

DEFAULT_METHODS = "deterministic,ensemble5,partial1,partial5,partial20,bayesian"
"""The methods of the paper's Table 1."""

SWEEP_R_BAYES = (0.01, 0.05, 0.10, 0.20, 0.40, 0.80)
"""The r_bayes values of the paper's sweep (its Figure 4)."""

FILES = {"table": "results.md", "json": "results.json", "sweep": "r_bayes_sweep.png"}
"""The files :meth:`BenchmarkResult.write` writes into its folder."""


def sweep_method_names(r_values: Sequence[float] = SWEEP_R_BAYES) -> dict[str, float]:
    """{method name: r_bayes} of a sweep: ``{"partial1": 0.01, "partial5": 0.05, ...}``."""
    names = {}
    for r in r_values:
        if not 0.0 < float(r) <= 1.0:
            raise ValueError(f"r_bayes values must be in (0, 1] (0.01 is 1 %), got {r!r}")
        names[f"partial{100 * float(r):g}"] = float(r)
    return names


@dataclass
class BenchmarkResult:
    """The rows of a benchmark (dicts of :func:`~bnnconvert.methods.compare_methods_on_data`).

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

    def markdown(self) -> str:
        """The report: settings, the comparison table and, with a sweep, its table and
        figure (linked as ``r_bayes_sweep.png``)."""
        parts = ["# Benchmark", "", *_settings_lines(self.settings)]
        parts += ["", "## Comparison", "", results_markdown(self.rows)]
        if self.sweep:
            parts += ["", "## r_bayes sweep", "", results_markdown(self.sweep), ""]
            parts += [f"![r_bayes sweep]({FILES['sweep']})"]
        return "\n".join(parts) + "\n"

    def sweep_figure(self, path: str | os.PathLike | None = None, *, dpi: int = 100) -> Figure:
        """The paper's Figure 4 from the sweep rows: task metric, ECE, NLL, Brier (and
        the OOD AUROC when measured) against r_bayes, the training FLOPs on the right
        axis, the other requested methods as horizontal lines."""
        from .plots import r_bayes_sweep

        if not self.sweep:
            raise ValueError("no sweep in this result; run_benchmark(..., sweep=SWEEP_R_BAYES)")
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
        """Rows, sweep and settings as JSON (NaN as null)."""
        record = {"settings": self.settings, "rows": self.rows, "sweep": self.sweep}
        return json.dumps(_json_safe(record), indent=2) + "\n"

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``results.md``, ``results.json`` and (with a sweep) ``r_bayes_sweep.png``
        into ``folder`` (created if needed, its parent must exist). Everything is rendered
        first and each file is replaced atomically, so a failure leaves no torn file."""
        folder = check_output_folder(folder)
        contents = {
            FILES["table"]: self.markdown().encode(),
            FILES["json"]: self.to_json().encode(),
        }
        if self.sweep:
            buffer = io.BytesIO()
            self.sweep_figure().savefig(buffer, format="png")
            contents[FILES["sweep"]] = buffer.getvalue()
        folder.mkdir(exist_ok=True)
        paths = []
        for name, data in contents.items():
            _atomic_write_bytes(folder / name, data)
            paths.append(folder / name)
        return paths


def run_benchmark(
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
    train_kwargs: Mapping[str, Any] | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> BenchmarkResult:
    """The comparison of the paper on ``methods`` and the r_bayes ``sweep``.

    Args:
        model, train_data, test_data, task, epochs, pretrain_epochs, samples, seed,
            ood_data, val_data, train_kwargs, method_kwargs, progress: as in
            :func:`~bnnconvert.methods.compare_methods_on_data` (``model`` is a trained
            model or a factory of a fresh one; batches are (input (N, C, H, W), target)).
        methods: method names (:func:`~bnnconvert.methods.get_method`), a list or a
            comma-separated string; checked before anything trains.
        sweep: r_bayes values of the sweep (fractions, default 1 to 80 %); None or ()
            for none. Each runs as method ``partial<percent>``.
        settings: extra facts for the report (e.g. the data and model names).

    Returns a :class:`BenchmarkResult`.
    """
    names = check_method_names(methods)
    swept = sweep_method_names(sweep or ())
    todo = list(dict.fromkeys([*names, *swept]))  # each method once, in order
    start = time.perf_counter()
    rows = compare_methods_on_data(
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
        train_kwargs=train_kwargs,
        progress=progress,
    )
    by_name = {r["method"]: r for r in rows}
    facts = {
        "task": task,
        "epochs": epochs,
        "pretrain_epochs": epochs if pretrain_epochs is None else pretrain_epochs,
        "samples": samples,
        "seed": seed,
        **dict(settings or {}),
        **_machine(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return BenchmarkResult(
        rows=[by_name[n] for n in names],
        sweep=[{**by_name[n], "r_bayes": r} for n, r in swept.items()],
        settings=facts,
    )


# ---------------------------------------------------------------------- helpers
def check_output_folder(folder: str | os.PathLike) -> Path:
    """Fail early (before any training) if ``folder`` cannot be written into."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {folder} is a file; pass a folder name, e.g. {folder}_dir")
    parent = folder if folder.is_dir() else folder.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder's parent does not exist: {parent}; create it")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}")
    return folder


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads",
    }


def _settings_lines(settings: Mapping[str, Any]) -> list[str]:
    return [f"- {key}: {value}" for key, value in settings.items()]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------- the command
_DEFAULT_ARCH = {"segmentation": "bnnconvert.models:UNet"}
_DEFAULT_CLASSIFIER = "bnnconvert.models:resnet18"


@click.command(
    "benchmark",
    epilog="""\b
Examples:
  bnnconvert benchmark --data demo:digits --ood demo:ood --epochs 2 --out bench/
  bnnconvert benchmark det.pt --data chestmnist.npz --pretrain-epochs 50 \\
      --methods deterministic,ensemble5,partial1,partial5,partial20,bayesian --out bench/
  bnnconvert benchmark --arch bnnconvert.models:UNet --arch-kwargs base=8 \\
      --data demo:nuclei --batch-size 10 --no-sweep --out bench/

\b
Writes OUT/results.md (settings and the comparison table), OUT/results.json and, with
--sweep, OUT/r_bayes_sweep.png. Without MODEL or --arch, a ResNet18 (classification)
or UNet (segmentation) sized from the data is trained as step 1.""",
)
@click.argument("model", required=False)
@click.option("--data", required=True, help="Train and test data (its train/test splits).")
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    help="Comma-separated method names (see bnnconvert.methods.get_method).",
)
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(0))
@click.option(
    "--pretrain-epochs",
    type=click.IntRange(0),
    help="Step 1 epochs (default: --epochs); with MODEL: how long it was trained.",
)
@click.option("--samples", default=5, show_default=True, type=click.IntRange(1))
@click.option(
    "--sweep/--no-sweep",
    default=True,
    show_default=True,
    help="Also run partial 1, 5, 10, 20, 40, 80 % and plot the sweep.",
)
@click.option("--ood", help="Out-of-distribution data for the OOD AUROC (its --ood-split).")
@click.option("--ood-split", default="test", show_default=True)
@click.option("--test-split", default="test", show_default=True)
@click.option("--val-split", help="Validation split (the 'temperature' method needs one).")
@click.option(
    "--lr", type=float, help="SGD learning rate of every fit (default: bnnconvert.train's)."
)
@click.option(
    "--class-weights/--no-class-weights",
    default=True,
    show_default=True,
    help="Class-weighted loss (the paper's).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write into."
)
@model_options
@data_options
@click.pass_context
def benchmark_command(
    ctx: click.Context,
    model: str | None,
    data: str,
    methods: str,
    epochs: int,
    pretrain_epochs: int | None,
    samples: int,
    sweep: bool,
    ood: str | None,
    ood_split: str,
    test_split: str,
    val_split: str | None,
    lr: float | None,
    class_weights: bool,
    out: str,
    **o: Any,
) -> None:
    """Compare methods on your data: the paper's table and r_bayes sweep."""
    try:
        names = check_method_names(methods)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--methods") from None
    if "temperature" in (n.lower() for n in names) and val_split is None:
        raise click.BadParameter(
            "'temperature' needs --val-split (e.g. val)", param_hint="--methods"
        )
    check_output_folder(out)
    check_batch_size(o["batch_size"])
    train_data = cli_loader(data, "train", True, o)
    task, loss_fn = cli_task_loss(train_data, o["task"], False)
    task = task or "multiclass"
    net, label = _model(model, train_data, task, o)
    check_fit(net if isinstance(net, nn.Module) else net(), train_data, loss_fn, task)
    weights = data_class_weights(train_data) if class_weights else None
    result = run_benchmark(
        net,
        train_data,
        cli_loader(data, test_split, False, o),
        task=task,
        methods=names,
        sweep=SWEEP_R_BAYES if sweep else None,
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        samples=samples,
        seed=o["seed"],
        ood_data=cli_loader(ood, ood_split, False, o) if ood else None,
        val_data=cli_loader(data, val_split, False, o) if val_split else None,
        train_kwargs={
            "class_weights": weights,
            "device": o["device"],
            **({} if lr is None else {"lr": lr}),
        },
        settings={"data": data, "model": label, "ood": ood, "batch_size": o["batch_size"]},
        progress=show_progress(ctx),
    )
    for path in result.write(out):
        click.echo(f"wrote {path}")
    click.echo(results_markdown(result.rows).split("\n\n")[0])


def _model(spec: str | None, data: Iterable, task: str, o: Mapping[str, Any]):
    """(a trained model or a factory of a fresh one, its label for the report)."""
    if spec is not None:
        net = load_checkpoint(
            spec, o["arch"], o["arch_kwargs"] or None, trust_pickle=o["trust_pickle"]
        )
        return net, spec
    arch, kwargs = o["arch"], dict(o["arch_kwargs"] or {})
    if arch is None:
        arch = _DEFAULT_ARCH.get(task, _DEFAULT_CLASSIFIER)
        dataset = getattr(data, "dataset", None)
        for key in ("num_classes", "in_channels"):
            if hasattr(dataset, key):
                kwargs.setdefault(key, getattr(dataset, key))
    label = arch + "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return (lambda: build_model(arch, kwargs)), label
