"""Deprecated alias of :mod:`bnnconvert.training.distributed`, kept for one release."""

import warnings

from .training.distributed import *  # noqa: F403
from .training.distributed import __all__  # noqa: F401

warnings.warn(
    "bnnconvert.distributed is deprecated and will be removed; import from "
    "bnnconvert.training.distributed",
    DeprecationWarning,
    stacklevel=2,
)
