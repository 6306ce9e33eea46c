"""Deprecated alias of :mod:`bnnconvert.methods.comparison`, kept for one release."""

import warnings

from ..metrics import entropy_auroc
from .comparison import compare_methods_on_data, ood_auroc, results_markdown

__all__ = ["compare_methods_on_data", "entropy_auroc", "ood_auroc", "results_markdown"]

warnings.warn(
    "bnnconvert.methods.compare is deprecated and will be removed; import from "
    "bnnconvert.methods (evaluate_methods, results_markdown, ...) and bnnconvert.metrics "
    "(entropy_auroc)",
    DeprecationWarning,
    stacklevel=2,
)
