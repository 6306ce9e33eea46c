"""bnnconvert: turn a trained deterministic PyTorch model into a sparse Bayesian network.

The method of "Sparse Bayesian Networks" (Abboud, Lombaert, Kadoury, MICCAI 2024):
saliency pass -> select the top r_bayes entries -> convert -> ELBO training -> Monte Carlo
prediction with uncertainty.
"""

from .convert import BayesSummary, bayes_summary, convert, to_deterministic
from .elbo import BetaSchedule, ELBOTerms, elbo_loss, kl_loss
from .predict import mean_weights
from .saliency import Saliency, compute_saliency

__version__ = "0.1.0"

__all__ = [
    "BayesSummary",
    "BetaSchedule",
    "ELBOTerms",
    "Saliency",
    "bayes_summary",
    "compute_saliency",
    "convert",
    "elbo_loss",
    "kl_loss",
    "mean_weights",
    "to_deterministic",
]
