"""Method names, as the comparison and ``bnnconvert benchmark`` take them:
``get_method("partial1", model)``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .base import Method
from .checkpoint_ensemble import SWA, CheckpointEnsemble
from .deterministic import Deterministic
from .ensemble import Ensemble
from .full_bayes import FullBayes
from .laplace_last_layer import LaplaceLastLayer
from .last_layers import LastLayers
from .layer_ensemble import LayerEnsemble
from .mc_dropout import MonteCarloDropout
from .sparse import SparseBayes

__all__ = ["METHOD_NAMES", "check_method_names", "get_method"]

_FIXED: dict[str, tuple[type[Method], dict[str, Any]]] = {
    "deterministic": (Deterministic, {}),
    "temperature": (Deterministic, {"temperature_scaling": True}),
    "bayesian": (FullBayes, {"backend": "bnnconvert"}),
    "bayesian_torch": (FullBayes, {"backend": "bayesian-torch"}),
    "last_layer": (LastLayers, {"layers": 1}),
    "mc_dropout": (MonteCarloDropout, {}),
    "checkpoint_ensemble": (CheckpointEnsemble, {"cycles": 1}),
    "checkpoint_ensemble_multi": (CheckpointEnsemble, {"cycles": 3}),
    "swa": (SWA, {}),
    "layer_ensemble": (LayerEnsemble, {}),
    "laplace_ll": (LaplaceLastLayer, {}),
    "laplace_ll_diag": (LaplaceLastLayer, {"hessian_structure": "diag"}),
    "posterior_ll": (LastLayers, {"layers": 1, "posterior": "laplace", "moped_delta": 0.1}),
    "posterior_ll_kron": (
        LastLayers,
        {"layers": 1, "posterior": "laplace", "moped_delta": 0.1, "covariance": "kron"},
    ),
    "vi_ll": (LastLayers, {"layers": 1, "posterior": "vi", "moped_delta": 0.1}),
}

_NUMBER = r"(\d+(?:\.\d+)?)"
_PATTERNS: list[tuple[str, Callable[[re.Match], tuple[type[Method], dict[str, Any]]]]] = [
    (r"ensemble(\d+)", lambda m: (Ensemble, {"members": int(m[1])})),
    (rf"partial{_NUMBER}", lambda m: (SparseBayes, {"r_bayes": float(m[1]) / 100})),
    (
        rf"(grad2|fisher|magnitude|random){_NUMBER}",
        lambda m: (SparseBayes, {"criterion": m[1], "r_bayes": float(m[2]) / 100}),
    ),
    (r"last_layers(\d+)", lambda m: (LastLayers, {"layers": int(m[1])})),
    (
        rf"(laplace|vi){_NUMBER}",
        lambda m: (
            SparseBayes,
            {"posterior": m[1], "r_bayes": float(m[2]) / 100, "moped_delta": 0.1},
        ),
    ),
]

METHOD_NAMES = (
    *_FIXED,
    "ensembleM (e.g. ensemble5)",
    "partialP (grad2 at P %, e.g. partial1, partial5, partial20)",
    "magnitudeP, randomP, fisherP, grad2P (ablations, e.g. magnitude1, random1)",
    "last_layersN (the last N layers Bayesian)",
    "laplaceP, viP (grad2 at P %, the posterior fitted by fit_posterior and calibrated on "
    "the validation data, e.g. laplace1, vi1)",
)
"""The names :func:`get_method` understands (patterns described in words); a hyphen
may stand for an underscore ("laplace-ll")."""


def get_method(name: str, model: nn.Module, **kwargs: Any) -> Method:
    """The method called ``name`` built from ``model``; ``kwargs`` override its defaults
    (e.g. ``task="segmentation"``, ``samples=5``).

    Names: "deterministic", "temperature" (deterministic + temperature scaling),
    "ensemble5" (M = 5 members; any M), "partial1"/"partial5"/"partial20" (the sparse
    method, grad2 at r = 1/5/20 %), "magnitude1", "random1", "fisher1" (ablations at r in
    %), "bayesian" (ours at r = 100 %), "bayesian_torch" (dnn_to_bnn with MOPED),
    "last_layer" / "last_layers3" (Zeng et al.), "mc_dropout", "checkpoint_ensemble"
    (one cycle), "checkpoint_ensemble_multi" (3 cycles), "swa", "layer_ensemble",
    "laplace_ll" / "laplace_ll_diag" (last-layer Laplace of laplace-torch, Kronecker-factored
    or diagonal Hessian; needs ``pip install "bnnconvert[compare]"``). Names are
    case-insensitive and a hyphen may stand for an underscore ("laplace-ll").
    """
    cls, defaults = _lookup(name)
    return cls(model, **{**defaults, "name": name, **kwargs})


def check_method_names(names: str | Sequence[str], task: str | None = None) -> list[str]:
    """The method names of a list or a comma-separated string ("deterministic,partial1"),
    stripped; ValueError naming the first unknown one (and the known names) or an empty
    list, before anything is built or trained. Each method's
    :meth:`~bnnconvert.methods.Method.check_available` runs too: ValueError for a method
    that cannot handle ``task`` (None: not checked), ImportError for a missing optional
    package."""
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [str(n).strip() for n in items]
    if not items or not all(items):
        raise ValueError(f"empty method name in {names!r}; known: {', '.join(METHOD_NAMES)}")
    for cls in dict.fromkeys([_lookup(name)[0] for name in items]):  # names first, then tasks
        cls.check_available(task)
    return items


def _lookup(name: str) -> tuple[type[Method], dict[str, Any]]:
    """The class and default keyword arguments of the method called ``name``."""
    key = name.strip().lower().replace("-", "_")
    if key in _FIXED:
        return _FIXED[key]
    for pattern, build in _PATTERNS:
        match = re.fullmatch(pattern, key)
        if match:
            return build(match)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")
