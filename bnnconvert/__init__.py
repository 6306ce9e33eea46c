"""bnnconvert: turn a trained deterministic PyTorch model into a sparse Bayesian network.

The method of "Sparse Bayesian Networks" (Abboud, Lombaert, Kadoury, MICCAI 2024):
saliency pass -> select the top r_bayes entries -> convert -> ELBO training -> Monte Carlo
prediction with uncertainty.
"""

from .convert import BayesSummary, bayes_summary, convert, to_deterministic
from .elbo import BetaSchedule, ELBOTerms, elbo_loss, kl_loss
from .flops import ComparisonTable, FlopReport, compare_methods, count_flops, training_cost
from .io import convert_checkpoint, load, load_checkpoint, save
from .predict import Prediction, mean_weights, predict, predict_batches
from .saliency import Saliency, compute_saliency

__version__ = "0.1.0"

__all__ = [
    "BayesSummary",
    "BetaSchedule",
    "ComparisonTable",
    "ELBOTerms",
    "FlopReport",
    "Prediction",
    "Saliency",
    "bayes_summary",
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
