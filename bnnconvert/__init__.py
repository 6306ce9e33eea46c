"""bnnconvert: turn a trained deterministic PyTorch model into a sparse Bayesian network.

The method of "Sparse Bayesian Networks" (Abboud, Lombaert, Kadoury, MICCAI 2024):
saliency pass -> select the top r_bayes entries -> convert -> fit the posterior (Laplace,
VI or the paper's ELBO) -> calibrate it on validation data -> Monte Carlo prediction with
uncertainty.
"""

from ._version import __version__ as __version__
from .calibration import Calibration, calibrate_posterior, synthetic_outliers
from .cases import CaseReport, predict_cases
from .convert import BayesSummary, bayes_summary, convert, last_layer_masks, to_deterministic
from .costs import ComparisonTable, compare_method_costs, compare_methods
from .elbo import BetaSchedule, ELBOTerms, elbo_loss, kl_loss
from .flops import FlopReport, count_flops, training_cost
from .pipeline import convert_checkpoint
from .posterior import PosteriorReport, RSweep, fit_posterior, select_r_bayes
from .predict import (
    BatchFormat,
    Prediction,
    mean_weights,
    predict,
    predict_batches,
    set_predictive,
)
from .saliency import Saliency, compute_saliency
from .serialization import load, load_checkpoint, save

# Every public name: import it above, list it here (sorted) and give it a row in the table
# "The top-level API" of docs/api.md; tests/test_api.py checks all three.
__all__ = [
    "BatchFormat",
    "BayesSummary",
    "BetaSchedule",
    "Calibration",
    "CaseReport",
    "ComparisonTable",
    "ELBOTerms",
    "FlopReport",
    "PosteriorReport",
    "Prediction",
    "RSweep",
    "Saliency",
    "bayes_summary",
    "calibrate_posterior",
    "compare_method_costs",
    "compare_methods",
    "compute_saliency",
    "convert",
    "convert_checkpoint",
    "count_flops",
    "elbo_loss",
    "fit_posterior",
    "kl_loss",
    "last_layer_masks",
    "load",
    "load_checkpoint",
    "mean_weights",
    "predict",
    "predict_batches",
    "predict_cases",
    "save",
    "select_r_bayes",
    "set_predictive",
    "synthetic_outliers",
    "to_deterministic",
    "training_cost",
]
