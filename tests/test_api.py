"""The public API: every top-level name, and the old module paths kept for one release
(deprecated aliases that give the same objects, with a DeprecationWarning)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import bnnconvert

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"

TOP_LEVEL = [
    "BatchFormat",
    "BayesSummary", "BetaSchedule", "Calibration", "ComparisonTable", "ELBOTerms",
    "FlopReport", "PosteriorReport", "Prediction", "RSweep", "Saliency", "bayes_summary",
    "calibrate_posterior", "compare_method_costs", "compare_methods", "compute_saliency",
    "convert", "convert_checkpoint", "count_flops", "elbo_loss", "fit_posterior", "kl_loss",
    "last_layer_masks", "load", "load_checkpoint", "mean_weights", "predict",
    "predict_batches", "save", "select_r_bayes", "to_deterministic", "training_cost",
]  # fmt: skip


def test_top_level_names():
    """The names the design fixes stay public (new ones may join them, documented below)."""
    assert set(TOP_LEVEL) <= set(bnnconvert.__all__)
    assert len(set(bnnconvert.__all__)) == len(bnnconvert.__all__), "a name listed twice"
    for name in TOP_LEVEL:
        assert getattr(bnnconvert, name) is not None
    assert bnnconvert.__version__


def test_all_is_every_public_name_and_each_imports():
    """``__all__`` is exactly the public (not underscored, not a submodule) names the
    package root binds, and ``from bnnconvert import NAME`` works for each."""
    public = {
        name
        for name, value in vars(bnnconvert).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(bnnconvert.__all__), (
        f"imported but not in __all__: {sorted(public - set(bnnconvert.__all__))}; "
        f"in __all__ but not bound: {sorted(set(bnnconvert.__all__) - public)}"
    )
    for name in bnnconvert.__all__:
        namespace: dict = {}
        exec(f"from bnnconvert import {name}", namespace)
        assert namespace[name] is getattr(bnnconvert, name)


def _api_table_names() -> set[str]:
    """The names in the first column of docs/api.md's table "The top-level API"."""
    section = API_PAGE.read_text().split("## The top-level API", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| [")]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split(" | ")[0])}


def test_every_public_name_is_in_the_api_reference_table():
    """Every name of ``__all__`` has a row in docs/api.md's top-level table, and every name
    of that table is public (mkdocs --strict checks that each link resolves)."""
    documented = _api_table_names()
    assert {"predict", "convert", "Saliency"} <= documented  # the parser reads the table
    missing = sorted(set(bnnconvert.__all__) - documented)
    assert not missing, f"add a row to docs/api.md's 'The top-level API' table for {missing}"
    extra = sorted(documented - set(bnnconvert.__all__))
    assert not extra, f"docs/api.md's top-level table lists {extra}, not in bnnconvert.__all__"


ALIASES = {  # old module: {old name: (new module, new name)}
    "bnnconvert.hoist": {n: ("bnnconvert.sampling", n) for n in ("mc_outputs", "mc_samples",
                                                                 "hoist_plan", "HoistPlan")},
    "bnnconvert.train": {
        "train": ("bnnconvert.training", "train"),
        "evaluate_model": ("bnnconvert.training", "evaluate_model"),
        "check_fit": ("bnnconvert.training", "check_fit"),
        "seed_everything": ("bnnconvert.training", "seed_everything"),
        "checkpoint_path_for": ("bnnconvert.training", "checkpoint_path_for"),
        "StepInfo": ("bnnconvert.training", "StepInfo"),
        "TrainResult": ("bnnconvert.training", "TrainResult"),
        "task_loss": ("bnnconvert.losses", "task_loss"),
        "data_task": ("bnnconvert.losses", "data_task"),
        "data_class_weights": ("bnnconvert.losses", "data_class_weights"),
        "TASKS": ("bnnconvert.losses", "TASKS"),
    },
    "bnnconvert.distributed": {n: ("bnnconvert.training.distributed", n)
                               for n in ("launch", "init_from_env", "shard", "rank_seed")},
    "bnnconvert.benchmark": {
        "BenchmarkResult": ("bnnconvert.methods", "ComparisonReport"),
        "SWEEP_R_BAYES": ("bnnconvert.methods.comparison", "SWEEP_R_BAYES"),
        "sweep_method_names": ("bnnconvert.methods.comparison", "sweep_method_names"),
    },
    "bnnconvert.methods.compare": {
        "entropy_auroc": ("bnnconvert.metrics", "entropy_auroc"),
        "results_markdown": ("bnnconvert.methods", "results_markdown"),
        "ood_auroc": ("bnnconvert.methods", "ood_auroc"),
    },
}  # fmt: skip


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_deprecated_module_paths_still_import_the_same_objects(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.") + " is deprecated"):
        module = importlib.import_module(old)
    for name, (new, new_name) in ALIASES[old].items():
        assert getattr(module, name) is getattr(importlib.import_module(new), new_name), name


def test_deprecated_function_names_warn_and_delegate(monkeypatch):
    from bnnconvert import costs
    from bnnconvert.methods import comparison

    seen = []
    monkeypatch.setattr(costs, "compare_method_costs", lambda *a, **k: seen.append(a) or "t")
    monkeypatch.setattr(comparison, "evaluate_methods", lambda *a, **k: seen.append(a) or "r")
    with pytest.warns(DeprecationWarning, match="compare_method_costs"):
        assert bnnconvert.compare_methods("model", "x") == "t"
    with pytest.warns(DeprecationWarning, match="evaluate_methods"):
        assert comparison.compare_methods_on_data("model") == "r"
    assert seen == [("model", "x"), ("model",)]


def test_io_is_gone_and_its_names_live_on():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bnnconvert.io")
    from bnnconvert.data import demo_dataset, open_data  # noqa: F401
    from bnnconvert.pipeline import convert_checkpoint
    from bnnconvert.serialization import (  # noqa: F401
        ARCH_ATTR,
        build_model,
        describe,
        load,
        load_checkpoint,
        parse_arch_kwargs,
        resolve_arch,
        save,
    )

    assert convert_checkpoint is bnnconvert.convert_checkpoint
    assert (load, save, load_checkpoint) == (bnnconvert.load, bnnconvert.save,
                                             bnnconvert.load_checkpoint)  # fmt: skip


def test_import_and_the_cli_leave_the_heavy_optional_libraries_unloaded():
    """``import bnnconvert`` and the CLI's import load torch but not torchmetrics,
    torchvision, scipy, scikit-learn, matplotlib, laplace-torch or bayesian-torch (each
    costs seconds at every ``bnnconvert`` command; they load where they are used)."""
    import subprocess

    heavy = ("torchmetrics", "torchvision", "scipy", "sklearn", "matplotlib", "laplace",
             "bayesian_torch")  # fmt: skip
    code = (
        "import sys, bnnconvert, bnnconvert.cli; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    # where they are used they load: an AUROC goes through torchmetrics
    auroc = bnnconvert.metrics.auc(torch.tensor([[0.1], [0.9]]), torch.tensor([[0], [1]]))
    assert float(auroc) == 1.0
