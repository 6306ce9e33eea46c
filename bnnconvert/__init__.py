"""bnnconvert: turn a trained deterministic PyTorch model into a sparse Bayesian network.

The method of "Sparse Bayesian Networks" (Abboud, Lombaert, Kadoury, MICCAI 2024):
saliency pass -> select the top r_bayes entries -> convert -> ELBO training -> Monte Carlo
prediction with uncertainty.
"""

from ._version import __version__ as __version__
from .convert import BayesSummary, bayes_summary, convert, to_deterministic
from .costs import ComparisonTable, compare_method_costs, compare_methods
from .elbo import BetaSchedule, ELBOTerms, elbo_loss, kl_loss
from .flops import FlopReport, count_flops, training_cost
from .pipeline import convert_checkpoint
from .predict import Prediction, mean_weights, predict, predict_batches
from .saliency import Saliency, compute_saliency
from .serialization import load, load_checkpoint, save

__all__ = [
    "BayesSummary",
    "BetaSchedule",
    "ComparisonTable",
    "ELBOTerms",
    "FlopReport",
    "Prediction",
    "Saliency",
    "bayes_summary",
    "compare_method_costs",
    "compare_methods",
    "compute_saliency",
    "convert",
    "convert_checkpoint",
    "count_flops",
    "elbo_loss",
    "kl_loss",
    "load",
    "load_checkpoint",
    "mean_weights",
    "predict",
    "predict_batches",
    "save",
    "to_deterministic",
    "training_cost",
]
