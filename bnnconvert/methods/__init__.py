"""Baselines from the literature under one protocol, beside the sparse Bayesian method.

Every method is built from the user's model, trained with a given budget and predicts the
same :class:`~bnnconvert.Prediction` as :func:`bnnconvert.predict`, so one evaluation
(:func:`bnnconvert.metrics.evaluate`) compares them all::

    from bnnconvert.methods import get_method
    method = get_method("partial1", trained_model, task="multiclass")
    method.fit(train_loader, epochs=2, seed=0)
    prediction = method.predict(test_loader)
    method.num_parameters(), method.flops(batch)

See :class:`Method` for the protocol, :func:`get_method` for the names,
:func:`evaluate_methods` for the paper's comparison protocol and :func:`run_comparison`
for its report (what ``bnnconvert benchmark`` writes).
"""

from ..convert import last_convertible_layers
from ..metrics import entropy_auroc
from .base import FitRun, Method, reseed_data
from .checkpoint_ensemble import SWA, CheckpointEnsemble, checkpoint_epochs, lr_at
from .comparison import (
    ComparisonReport,
    compare_methods_on_data,
    evaluate_methods,
    ood_auroc,
    paired_markdown,
    per_item_values,
    results_markdown,
    run_comparison,
    without_items,
)
from .deterministic import Deterministic, fit_temperature
from .ensemble import Ensemble, reset_parameters
from .full_bayes import FullBayes, bayesian_torch_convert
from .laplace_last_layer import LaplaceLastLayer
from .last_layers import LastLayers
from .layer_ensemble import LayerEnsemble, LayerEnsembleNet, default_stages
from .mc_dropout import MCDropout, MonteCarloDropout, insert_dropout
from .registry import METHOD_NAMES, get_method
from .sparse import SparseBayes
from .variational import VariationalMethod

__all__ = [
    "METHOD_NAMES",
    "SWA",
    "CheckpointEnsemble",
    "ComparisonReport",
    "Deterministic",
    "Ensemble",
    "FitRun",
    "FullBayes",
    "LaplaceLastLayer",
    "LastLayers",
    "LayerEnsemble",
    "LayerEnsembleNet",
    "MCDropout",
    "Method",
    "MonteCarloDropout",
    "SparseBayes",
    "VariationalMethod",
    "bayesian_torch_convert",
    "checkpoint_epochs",
    "compare_methods_on_data",
    "default_stages",
    "entropy_auroc",
    "evaluate_methods",
    "fit_temperature",
    "get_method",
    "insert_dropout",
    "last_convertible_layers",
    "lr_at",
    "ood_auroc",
    "paired_markdown",
    "per_item_values",
    "reseed_data",
    "reset_parameters",
    "results_markdown",
    "run_comparison",
    "without_items",
]
