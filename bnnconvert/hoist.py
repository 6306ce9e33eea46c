"""Deprecated alias of :mod:`bnnconvert.sampling` (the Monte Carlo forwards), kept for one
release: import ``mc_outputs``, ``mc_samples`` and ``hoist_plan`` from
``bnnconvert.sampling`` instead."""

import warnings

from .sampling import HoistPlan, hoist_plan, mc_outputs, mc_samples

__all__ = ["HoistPlan", "hoist_plan", "mc_outputs", "mc_samples"]

warnings.warn(
    "bnnconvert.hoist is deprecated and will be removed; import from bnnconvert.sampling",
    DeprecationWarning,
    stacklevel=2,
)
