"""Deprecated alias, kept for one release: the comparison of methods lives in
:mod:`bnnconvert.methods.comparison` (``run_benchmark`` is now
:func:`~bnnconvert.methods.run_comparison`, ``BenchmarkResult`` is
:class:`~bnnconvert.methods.ComparisonReport`) and the ``bnnconvert benchmark`` command in
:mod:`bnnconvert.cli`. "Benchmark" now names only the speed and memory benchmarks of
``benchmarks/``."""

import warnings
from typing import Any

from ._utils import check_output_folder
from .methods.comparison import DEFAULT_METHODS, SWEEP_R_BAYES, run_comparison, sweep_method_names
from .methods.comparison import REPORT_FILES as FILES
from .methods.comparison import ComparisonReport as BenchmarkResult

__all__ = [
    "DEFAULT_METHODS",
    "FILES",
    "SWEEP_R_BAYES",
    "BenchmarkResult",
    "check_output_folder",
    "run_benchmark",
    "sweep_method_names",
]


def run_benchmark(*args: Any, settings: Any = None, **kwargs: Any) -> BenchmarkResult:
    """:func:`~bnnconvert.methods.run_comparison`, whose ``facts`` this old name called
    ``settings``."""
    return run_comparison(*args, facts=settings, **kwargs)


warnings.warn(
    "bnnconvert.benchmark is deprecated and will be removed; import run_comparison and "
    "ComparisonReport from bnnconvert.methods",
    DeprecationWarning,
    stacklevel=2,
)
